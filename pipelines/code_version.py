"""The code version a compiled pipeline's tasks carry, so a KFP cache key follows the code.

A KFP backend reuses a cached task when its image string, its command (the component's source) and
its inputs match. The project image is referenced by a tag (`…/shopvision:0.1.0`) that a rebuild
moves, and a component's source is a thin wrapper that barely changes while the step code it calls
does: without more, results computed by old code are served for new code. So each component's
shipped source ends with a comment naming the code version — the package version and a hash of
every source file of the shopvision package — and a changed code version is a changed command,
hence a cache miss. Compiling with an image digest (`--image-digest`, or `--image repo@sha256:…`)
pins the image itself as well.
"""

import hashlib
import importlib.util
import re
from pathlib import Path

from shopvision.components.errors import StepError

PACKAGES = ("shopvision", "shopvision.components", "shopvision.pipelines", "shopvision.serving")
SOURCE_SUFFIXES = (".py", ".html", ".css", ".js")
SKIPPED_FOLDERS = ("__pycache__", "compiled")  # compiled/: the pipeline YAML this version is stamped into
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def source_files() -> list[tuple[str, Path]]:
    """(name, file) for every source file of the package, named by package so the version does not
    depend on where (or whether editable) the package is installed."""
    nested = {package.rsplit(".", 1)[1] for package in PACKAGES[1:]}
    files = []
    for package in PACKAGES:
        for folder in importlib.util.find_spec(package).submodule_search_locations:
            root = Path(folder)
            for path in root.rglob("*"):
                relative = path.relative_to(root)
                if (
                    path.suffix not in SOURCE_SUFFIXES
                    or not path.is_file()
                    or set(relative.parts[:-1]) & set(SKIPPED_FOLDERS)
                    or (package == "shopvision" and relative.parts[0] in nested)  # listed on their own
                ):
                    continue
                files.append((f"{package}:{relative.as_posix()}", path))
    return sorted(files)


def code_version(files: list[tuple[str, Path]] | None = None) -> str:
    """'<package version>+<first 16 hex of a sha256 over the source files' names and bytes>'."""
    from shopvision import __version__

    digest = hashlib.sha256()
    for name, path in source_files() if files is None else files:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{digest.hexdigest()[:16]}"


def pinned_image(image: str, digest: str | None) -> str:
    """IMAGE pinned at DIGEST (`repo@sha256:…`, the tag dropped), or IMAGE itself when it already names
    a digest; a malformed digest is a clear error."""
    if digest is not None:
        if not DIGEST.fullmatch(digest):
            raise StepError(f"--image-digest {digest!r} is not sha256:<64 lowercase hex digits>")
        repository = image.split("@", 1)[0]
        name, _, tag = repository.rpartition(":")
        if name and "/" not in tag:  # a tag, not a registry port (host:5000/repo)
            repository = name
        return f"{repository}@{digest}"
    if "@" in image and not DIGEST.fullmatch(image.split("@", 1)[1]):
        raise StepError(f"image {image!r}: the part after @ is not sha256:<64 lowercase hex digits>")
    return image
