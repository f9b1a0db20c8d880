"""A model trained from a Hugging Face folder, exported back in its own architecture: the folder's
config, the trained base model and the head's weight as lm_head, and the tokenizer, loadable by
`AutoModelForCausalLM.from_pretrained`. (Our own body goes out as Llama: hf_llama.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmtrain.data.cache import sha256_file
from llmtrain.data.tokenizer import KNOWN_EOS_TOKENS
from llmtrain.heads import HEADS, head_class
from llmtrain.model.hf import empty_causal_lm, read_hf_folder
from llmtrain.recipe import Recipe

# What a model folder carries beside config and weights for its tokenizer and generation.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hf_export_problem(recipe: Recipe) -> str | None:
    """Why this run has no faithful export in its Hugging Face architecture, or None."""
    head = recipe.head_spec()
    if not head_class(head["type"]).linear_lm_head:
        linear = ", ".join(n for n in HEADS if head_class(n).linear_lm_head)
        return f"the {head['type']} head is not an lm_head (only {linear} are)"
    hf = read_hf_folder(recipe.model.hf)
    arch = (hf.config.architectures or [hf.config.model_type])[0]
    if head.get("bias") and empty_causal_lm(hf.config).get_output_embeddings().bias is None:
        return f"head.bias: {arch}'s lm_head has no bias"
    if (head.get("softcap") or None) != (hf.softcap or None):
        return f"head.softcap={head.get('softcap')}: {arch} applies a final-logit softcap of {hf.softcap}"
    return None


def write_hf_export(model, recipe: Recipe, tokenizer_path: Path, folder: Path) -> None:
    """Write `model` (a LanguageModel over recipe.model.hf, fp32 on CPU) as a transformers folder."""
    hf = read_hf_folder(recipe.model.hf)
    lm = empty_causal_lm(hf.config)
    prefix = lm.base_model_prefix
    state = {f"{prefix}.{k}": v.detach() for k, v in model.body.model.state_dict().items()}
    if model.head.weight is not model.body.embed.weight:
        state["lm_head.weight"] = model.head.weight.detach()
    if getattr(model.head, "bias", None) is not None:
        state["lm_head.bias"] = model.head.bias.detach()
    missing, unexpected = lm.load_state_dict(state, strict=False, assign=True)
    lm.tie_weights()  # a tied lm_head follows the assigned embedding
    still_meta = [n for n, p in lm.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise RuntimeError(f"export: the trained weights do not fill {type(lm).__name__} "
                           f"(unassigned {still_meta[:5]}, unexpected {unexpected[:5]})")
    folder.mkdir(parents=True)
    lm.save_pretrained(folder, safe_serialization=True)
    write_tokenizer_files(tokenizer_path, folder, recipe.model.seq_len, hf.path)


def write_tokenizer_files(tokenizer_path: Path, folder: Path, seq_len: int, source: Path | None = None) -> None:
    """tokenizer.json and what transformers reads beside it: the model folder's own files when the
    run trained with that folder's tokenizer, else a minimal tokenizer_config.json naming the
    end-of-document token."""
    from tokenizers import Tokenizer

    shutil.copyfile(tokenizer_path, folder / "tokenizer.json")
    own = source is not None and (source / "tokenizer.json").is_file() and \
        sha256_file(source / "tokenizer.json") == sha256_file(Path(tokenizer_path))
    if own:
        for name in TOKENIZER_SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
        return
    tok = Tokenizer.from_file(str(tokenizer_path))
    eos = next((t for t in KNOWN_EOS_TOKENS if tok.token_to_id(t) is not None), None)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len}
    if eos:
        config.update(eos_token=eos, bos_token=eos)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

