"""Publishing: a model card generated from the run, and upload of an exported folder to the Hugging Face Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from gptforge.errors import GptforgeError

LICENSE_DEFAULT = "apache-2.0"


def find_run_dir(checkpoint_dir: Path) -> Path | None:
    """The run directory a checkpoint belongs to (``runs/<name>/ckpt/step_N`` → ``runs/<name>``), if any."""
    for parent in [checkpoint_dir, *checkpoint_dir.parents][:4]:
        if (parent / "config.yaml").is_file() or (parent / "metrics.jsonl").is_file():
            return parent
    return None


def collect_run_facts(checkpoint_dir: Path) -> dict:
    """Gather what the card reports: model shape, training config, tokens seen, final/best losses, eval results."""
    facts: dict = {"checkpoint": str(checkpoint_dir)}
    meta_path = checkpoint_dir / "model_config.json"
    if meta_path.is_file():
        facts["meta"] = json.loads(meta_path.read_text(encoding="utf-8"))
    state_path = checkpoint_dir / "state.json"
    if state_path.is_file():
        try:
            facts["state"] = json.loads(state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
    run = find_run_dir(checkpoint_dir)
    if run is not None:
        facts["run_dir"] = str(run)
        if (run / "config.yaml").is_file():
            facts["config"] = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        evals = {}
        for path in sorted(run.glob("eval*/*.json")) + sorted(run.glob("eval*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError):
                continue
            if isinstance(data, dict):
                evals[path.stem] = {k: v for k, v in data.items() if isinstance(v, (int, float, str))}
        if evals:
            facts["evals"] = evals
    return facts


def render_model_card(facts: dict, repo_id: str | None = None, license: str = LICENSE_DEFAULT,
                      datasets: list[str] | None = None) -> str:
    """Markdown model card with Hub metadata front matter."""
    meta = facts.get("meta") or {}
    model = meta.get("model", {})
    state = facts.get("state") or {}
    config = facts.get("config") or {}
    modern = (model.get("family") or meta.get("family")) == "modern"
    hf_class = ("Qwen3ForCausalLM" if model.get("qk_norm") else "LlamaForCausalLM") if modern else "GPT2LMHeadModel"
    arch_tag = ("qwen3" if model.get("qk_norm") else "llama") if modern else "gpt2"
    front = {"license": license, "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["gptforge", arch_tag, "causal-lm"]}
    if datasets:
        front["datasets"] = datasets
    name = repo_id or Path(facts.get("run_dir") or facts["checkpoint"]).name
    what = ("A modern-architecture (RoPE, RMSNorm, SwiGLU) causal language model" if modern
            else "A GPT-2-architecture causal language model")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"{what} trained with gptforge and exported as a plain `{hf_class}` (no custom code needed).", ""]
    if model and modern:
        from gptforge.model_modern import config_from_dict
        from gptforge.model_modern import count_params as modern_params

        cfg = config_from_dict({**model, "family": "modern"})
        lines += ["## Model", "", "| field | value |", "|---|---|",
                  f"| parameters | {modern_params(cfg):,} |",
                  f"| layers / heads (kv heads) / width | {cfg.n_layer} / {cfg.n_head} ({cfg.n_kv_head}) / {cfg.n_embd} |",
                  f"| MLP | {cfg.mlp}, hidden {cfg.mlp_hidden} |",
                  f"| context length | {cfg.block_size} (RoPE, theta {cfg.rope_theta:g}) |",
                  f"| vocabulary | {cfg.vocab_size:,} |", f"| tied embeddings | {cfg.tie_embeddings} |",
                  f"| QK-norm | {cfg.qk_norm} |", ""]
    elif model:
        from gptforge.model import GPTConfig, count_params

        cfg = GPTConfig(**model)
        lines += ["## Model", "", "| field | value |", "|---|---|",
                  f"| parameters | {count_params(cfg):,} |",
                  f"| layers / heads / width | {cfg.n_layer} / {cfg.n_head} / {cfg.n_embd} |",
                  f"| context length | {cfg.block_size} |", f"| vocabulary | {cfg.vocab_size:,} |",
                  f"| tied embeddings | {cfg.tie_embeddings} |", f"| biases (linear/LN, qkv) | {cfg.bias}, {cfg.qkv_bias} |",
                  ""]
    training = []
    if state.get("step") is not None:
        training.append(f"| optimizer steps | {state['step']:,} |")
    if state.get("tokens_seen") is not None:
        training.append(f"| training tokens | {int(state['tokens_seen']):,} |")
    data_cfg = config.get("data") if isinstance(config, dict) else None
    if isinstance(data_cfg, dict):
        for key in ("path", "dir", "train", "source"):
            if key in data_cfg:
                training.append(f"| data | `{data_cfg[key]}` |")
                break
    if training:
        lines += ["## Training", "", "| field | value |", "|---|---|", *training, ""]
    if config:
        lines += ["<details><summary>Recipe (resolved config)</summary>", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).strip(), "```", "", "</details>", ""]
    evals = facts.get("evals") or {}
    if evals:
        lines += ["## Evaluation", "", "| result | metric | value |", "|---|---|---|"]
        for result, metrics in evals.items():
            for metric, value in metrics.items():
                if isinstance(value, float):
                    value = f"{value:.4f}"
                lines.append(f"| {result} | {metric} | {value} |")
        lines.append("")
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{name}")', f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              "```", "", "## License", "", f"Weights released under `{license}`; check the licenses of the training data.",
              ""]
    return "\n".join(lines)


def export_with_card(checkpoint: str | Path, out_dir: str | Path, repo_id: str | None = None,
                     license: str = LICENSE_DEFAULT, datasets: list[str] | None = None,
                     overwrite: bool = False) -> Path:
    """Export to a HF folder and write ``README.md`` (the model card) into it.

    ``out_dir`` must be new or empty unless ``overwrite`` (a user's own README.md is never replaced unasked).
    """
    from gptforge.checkpoint import load_model, resolve_checkpoint
    from gptforge.hf import export_model
    from gptforge.io import output_directory

    output_directory(out_dir, "--out", overwrite)
    directory = resolve_checkpoint(checkpoint)
    model, tokenizer, _ = load_model(directory)
    card = render_model_card(collect_run_facts(directory), repo_id, license, datasets)
    return export_model(model, tokenizer, out_dir, extra_files={"README.md": card})


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (if needed) and upload ``folder`` to the Hub model repo ``repo_id``; returns the repo URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise GptforgeError("publishing needs huggingface_hub: pip install 'gptforge[hf]'") from None
    if "/" not in repo_id:
        raise GptforgeError(f"--push-to-hub expects OWNER/NAME, got {repo_id!r}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise GptforgeError("HF_HUB_OFFLINE=1 is set: unset it to upload (the exported folder is ready on disk)")
    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload model exported with gptforge")
    except Exception as e:  # network, auth, permissions: report in one line
        raise GptforgeError(f"upload to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                            " (log in with `hf auth login` or set HF_TOKEN)") from None
    return f"https://huggingface.co/{repo_id}"
