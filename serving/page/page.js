// The photo-check page: each photo goes to the server's own POST /predict (and POST /similar when
// the server has an index) in a request of its own, so one bad photo gets its own message and the
// others still get their answer. Everything the server says is put in the page as text, never as HTML.
"use strict";
(function () {
  var PARALLEL = 3; // requests in flight from this page
  var SIMILAR_K = 6;
  var server = { name: null, version: null, threshold: 0.5, source: "default", maxBody: null, similar: false };
  var queue = [];
  var running = 0;
  var ready = null; // resolves once the model's metadata is known

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function percent(p) { return (p * 100).toFixed(1) + "%"; }
  function mib(bytes) { return (bytes / 1048576).toFixed(bytes < 1048576 ? 2 : 1); }

  function notice(text) {
    var box = $("notice");
    box.textContent = text;
    box.hidden = !text;
  }

  // fetch, then the JSON body; a 4xx or 5xx becomes an Error whose message is the server's own words.
  function request(url, init) {
    return fetch(url, init).then(
      function (response) {
        return response.text().then(function (text) {
          var body = null;
          try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
          if (!response.ok) {
            var said = body && body.error ? body.error : (text || response.statusText).trim();
            var error = new Error(response.status + ": " + said);
            error.status = response.status;
            throw error;
          }
          return body;
        });
      },
      function () { throw new Error("the server could not be reached; is it still running?"); }
    );
  }

  function start() {
    ready = request("./", { headers: { Accept: "application/json" } })
      .then(function (index) {
        server.name = index.model_name;
        server.similar = (index.routes || []).indexOf("/similar") >= 0;
        return request("v2/models/" + encodeURIComponent(server.name));
      })
      .then(function (meta) {
        var parameters = meta.parameters || {};
        var limits = parameters.limits || {};
        server.version = (meta.versions || ["?"])[0];
        server.threshold = parameters.confidence_threshold;
        server.source = parameters.confidence_threshold_source || "default";
        server.maxBody = limits.max_body_bytes || null;
        $("model").textContent = "Model " + server.name + ", version " + server.version +
          " (" + (parameters.arch || "?") + "). Not confident under " + server.threshold +
          " (" + server.source + ")" + (server.similar ? "; with similar catalogue photos." : ".");
        var parts = [];
        if (limits.max_body_bytes) parts.push("at most " + mib(limits.max_body_bytes) + " MiB");
        if (limits.max_pixels_per_photo) parts.push((limits.max_pixels_per_photo / 1e6).toFixed(1) + " million pixels");
        if (limits.max_aspect_ratio) parts.push("sides at most " + limits.max_aspect_ratio + ":1");
        $("limits").textContent = parts.length ? "Per photo: " + parts.join(", ") + "." : "";
      })
      .catch(function (error) {
        $("model").textContent = "The model's details are not available.";
        notice("The server did not describe its model: " + error.message);
      });
  }

  function addFiles(files) {
    notice("");
    Array.prototype.forEach.call(files, function (file) {
      var card = makeCard(file);
      $("results").insertBefore(card, $("results").firstChild);
      queue.push(function () { return check(file, card); });
    });
    pump();
  }

  function pump() {
    while (running < PARALLEL && queue.length) {
      running += 1;
      queue.shift()().then(done, done);
    }
  }

  function done() { running -= 1; pump(); }

  function makeCard(file) {
    var card = el("article", "card");
    card.dataset.file = file.name;
    card.dataset.state = "checking";
    var head = el("div", "head");
    var photo = el("img", "photo");
    photo.alt = file.name;
    photo.src = URL.createObjectURL(file);
    photo.onerror = function () { photo.remove(); }; // not a photo, or a format the browser cannot show
    var body = el("div", "body");
    body.appendChild(el("h2", null, file.name));
    body.appendChild(el("p", "status muted", "Checking…"));
    head.appendChild(photo);
    head.appendChild(body);
    card.appendChild(head);
    return card;
  }

  function form(file) {
    var data = new FormData();
    data.append("file", file, file.name);
    return data;
  }

  function check(file, card) {
    return ready.then(function () {
      if (server.maxBody && file.size > server.maxBody) {
        throw new Error("413: this photo is " + mib(file.size) + " MiB; the server takes at most " +
          mib(server.maxBody) + " MiB per request (--max-body-mb)");
      }
      return request("predict", { method: "POST", body: form(file) });
    }).then(function (answer) {
      showPrediction(card, answer);
      if (!server.similar) return null;
      return request("similar?k=" + SIMILAR_K, { method: "POST", body: form(file) }).then(
        function (near) { showSimilar(card, near); },
        function (error) { showSimilarError(card, error); }
      );
    }).then(function () {
      card.dataset.state = "done";
    }, function (error) {
      showError(card, error);
    });
  }

  function showPrediction(card, answer) {
    var prediction = answer.predictions[0];
    var body = card.querySelector(".body");
    body.querySelector(".status").remove();
    var list = el("ol", "top");
    prediction.top.forEach(function (item) {
      var row = el("li");
      row.dataset.label = item.label;
      row.dataset.probability = String(item.probability);
      row.appendChild(el("span", "name", item.label));
      row.appendChild(el("span", "p", percent(item.probability)));
      var bar = el("span", "bar");
      var fill = el("span");
      fill.style.width = Math.max(0, Math.min(100, item.probability * 100)).toFixed(1) + "%";
      bar.appendChild(fill);
      row.appendChild(bar);
      list.appendChild(row);
    });
    body.appendChild(list);
    var best = prediction.top[0].probability;
    var threshold = answer.confidence_threshold;
    var flag = prediction.confident
      ? el("span", "flag confident", "confident: " + percent(best) + " ≥ threshold " + threshold)
      : el("span", "flag unsure", "not confident: " + percent(best) + " < threshold " + threshold);
    flag.dataset.confident = String(prediction.confident);
    body.appendChild(flag);
    body.appendChild(el("p", "served muted", "by " + answer.model_name + " version " + answer.model_version));
  }

  function showSimilar(card, near) {
    var section = el("section", "similar");
    section.appendChild(el("h3", null, "Most similar catalogue photos (of " + near.index_size + ")"));
    var list = el("ul");
    near.neighbours.forEach(function (n) {
      var item = el("li");
      item.dataset.category = n.category;
      item.dataset.similarity = String(n.similarity);
      var picture = el("img");
      picture.alt = n.path;
      picture.title = n.path + (n.product_id ? " (product " + n.product_id + ")" : "");
      picture.loading = "lazy";
      picture.src = "similar/photo?path=" + encodeURIComponent(n.path);
      picture.onerror = function () { picture.replaceWith(el("span", "nophoto", "no photo")); };
      item.appendChild(picture);
      item.appendChild(el("div", "category", n.category));
      item.appendChild(el("div", "muted", "similarity " + n.similarity.toFixed(3)));
      list.appendChild(item);
    });
    section.appendChild(list);
    card.appendChild(section);
  }

  function showSimilarError(card, error) {
    var section = el("section", "similar");
    section.appendChild(el("p", "error", "Similar photos: " + error.message));
    card.appendChild(section);
  }

  function showError(card, error) {
    card.dataset.state = "error";
    var body = card.querySelector(".body");
    var status = body.querySelector(".status");
    if (status) status.remove();
    var message = el("p", "error", error.message);
    message.setAttribute("role", "alert");
    body.appendChild(message);
  }

  var drop = $("drop");
  $("photos").addEventListener("change", function (event) {
    addFiles(event.target.files);
    event.target.value = ""; // the same photo may be picked again
  });
  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (event) { event.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function (event) { event.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (event) {
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
  });
  // A photo dropped beside the zone would make the browser leave the page for the photo.
  window.addEventListener("dragover", function (event) { event.preventDefault(); });
  window.addEventListener("drop", function (event) { event.preventDefault(); });
  start();
})();
