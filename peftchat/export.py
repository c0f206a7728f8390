"""`peftchat export SOURCE --gguf OUT.gguf`: a GGUF file for llama.cpp from an adapter or merged dir.

An adapter (a training output dir, a checkpoint, or a recipe whose run left one) is first merged
by `peftchat merge`'s code into a temporary fp32 model dir — fp32 so that the merge itself adds no
rounding and the only loss is the f16 / q8_0 storage — which is then written by `model.to_gguf`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from peftchat.errors import UserError
from peftchat.rundir import note as say
from peftchat.rundir import resolve_source
from peftchat.merge import merge_adapter


def export_gguf(source: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
                overrides: Iterable[str] = ()) -> Path:
    from peftchat.model.to_gguf import OUTTYPES, write_gguf

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("peftchat export needs the gguf package: pip install 'peftchat[export]'") from None
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if Path(out).is_dir():
        raise UserError(f"--gguf {out} is a directory; give a file name such as model.gguf")
    resolved = resolve_source(source, overrides)
    recipe, adapter_dir = resolved.recipe, resolved.adapter_dir
    name = Path(source).expanduser().resolve().stem
    if adapter_dir is None:
        if resolved.kind != "model":
            raise UserError(f"{source}: no trained adapter to export (train first, or pass a merged model dir)")
        return _check(recipe.model.path, write_gguf(recipe.model.path, out, outtype, name=name, say=say))
    with tempfile.TemporaryDirectory(prefix="peftchat-export-", dir=Path(out).expanduser().resolve().parent) as tmp:
        merged = Path(tmp) / "merged"
        say(f"merging {adapter_dir} into its base (fp32) for export ...")
        merge_adapter(adapter_dir, merged, dtype="fp32", force=True)  # verified as `peftchat merge` verifies
        return _check(merged, write_gguf(merged, out, outtype, name=name, say=say))


def _check(model_dir: str | os.PathLike, written: Path) -> Path:
    """Print how closely llama.cpp runs the file, when llama-cpp-python (extra `gguf-check`) is here."""
    from peftchat.model.gguf_parity import gguf_parity, llama_cpp_available

    if not llama_cpp_available():
        say("llama.cpp parity not checked (pip install 'peftchat[gguf-check]' to measure it)")
        return written
    try:
        parity = gguf_parity(model_dir, written)
    except ValueError as e:  # llama-cpp-python's answer when llama.cpp refuses the file
        raise UserError(f"{written} was written but llama.cpp cannot load it: {e}") from None
    say(parity.line())
    return written
