"""`peftchat export SOURCE --gguf OUT.gguf`: a GGUF file for llama.cpp from an adapter or merged dir.

An adapter (a training output dir, a checkpoint, or a recipe whose run left one) is first merged
by `peftchat merge`'s code into a temporary fp32 model dir beside the output (in a
`.peftchat-tmp-PID-*` dir) — fp32 so that the merge itself adds no rounding and the only loss is
the f16 / q8_0 storage — which is then written by `export.gguf`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from peftchat.errors import UserError
from peftchat.merge import merge_adapter
from peftchat.paths import check_new_file, check_outputs, remove_stale_temps, temp_path
from peftchat.rundir import note as say
from peftchat.rundir import resolve_source, source_paths


def export_gguf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    outtype: str = "f16",
    overrides: Iterable[str] = (),
    force: bool = False,
    parity: bool = False,
) -> Path:
    """Write `out` (refused when it exists, unless `force`; replaced atomically) from `source`."""
    from peftchat.export.gguf import OUTTYPES, write_gguf

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("peftchat export needs the gguf package: pip install 'peftchat[export]'") from None
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if parity:
        from peftchat.export.gguf_parity import llama_cpp_available

        if not llama_cpp_available():  # said before anything is merged or written
            raise UserError("export --parity needs llama-cpp-python: pip install 'peftchat[gguf-check]'")
    check_outputs([("--gguf", out)], source_paths(source, overrides))
    check_new_file(out, "--gguf", force)
    resolved = resolve_source(source, overrides)
    recipe, adapter_dir = resolved.recipe, resolved.adapter_dir
    name = Path(source).expanduser().resolve().stem
    if adapter_dir is None:
        if resolved.kind != "model":
            raise UserError(f"{source}: no trained adapter to export (train first, or pass a merged model dir)")
        written = write_gguf(recipe.model.path, out, outtype, name=name, say=say, force=force)
        return _check(recipe.model.path, written) if parity else written
    # The fp32 merge lives beside the output, never in a shared /tmp; everything it writes (its
    # partial dir and lock too) is inside one `.peftchat-tmp-PID-*` dir, so what a kill -9 leaves
    # is removed whole by the next export (or any atomic write there).
    target = Path(out).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(target.parent):
        say(f"note: removed {stale}, left by a peftchat command that was killed")
    tmp = temp_path(target.with_suffix(".merge"))
    tmp.mkdir()
    try:
        say(f"merging {adapter_dir} into its base (fp32) for export ...")
        merge_adapter(adapter_dir, tmp / "merged", dtype="fp32", force=True)  # verified as `peftchat merge` verifies
        written = write_gguf(tmp / "merged", out, outtype, name=name, say=say, force=force)
        return _check(tmp / "merged", written) if parity else written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check(model_dir: str | os.PathLike, written: Path) -> Path:
    """Print how closely llama.cpp runs the file (`--parity`: it loads the model twice more, so
    an export does not pay for it unless asked)."""
    from peftchat.export.gguf_parity import gguf_parity

    try:
        parity = gguf_parity(model_dir, written)
    except ValueError as e:  # llama-cpp-python's answer when llama.cpp refuses the file
        raise UserError(f"{written} was written but llama.cpp cannot load it: {e}") from None
    say(parity.line())
    return written
