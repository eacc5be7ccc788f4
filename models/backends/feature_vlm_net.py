"""A small LLaVA-style VLM on cached encoder features: sklesion features → projector → SmolLM2 (+ LoRA).

The image is not re-encoded: the lesion classifier's pooled features (and optionally its 7 class
probabilities) are mapped by an MLP projector to ``n_visual_tokens`` embeddings that replace a run of
placeholder tokens in the user turn of the chat prompt. The replacement happens in a forward pre-hook
on the LLM's decoder, so every path into the decoder (``model(...)``, ``generate``, TRL's fused LM
head, PEFT wrappers, FSDP/DDP) sees the same inputs, and the projector is a registered submodule of
the LLM (``feature_projector``): optimisers, device moves and distributed wrappers include it.

On disk (``save_pretrained``): ``feature_vlm.json`` (base LLM, encoder, prompt template, sizes),
``projector.safetensors`` (fp16 weights + the feature standardiser) and, after stage 2, a PEFT LoRA
adapter (``adapter_model.safetensors`` + ``adapter_config.json``). The base LLM weights come from the
registry (``smollm2-135m-instruct``) and are never copied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_NAME = "feature_vlm.json"
PROJECTOR_NAME = "projector.safetensors"
IMAGE_MARKER = "<image>"
DESCRIBE_PROMPT = "Describe the dermoscopic 7-point checklist findings."


@dataclass
class FeatureVLMConfig:
    """What ``feature_vlm.json`` stores; enough to rebuild the model around the registry's base LLM."""

    base_model: str = "smollm2-135m-instruct"
    encoder: str = "sklesion-xception"
    feature_dim: int = 2048
    use_probs: bool = True
    n_visual_tokens: int = 4
    projector_hidden: int = 512
    projector_dropout: float = 0.1
    image_token: str = "<empty_output>"
    system_prompt: str = "You are a dermoscopy assistant."
    describe_prompt: str = DESCRIBE_PROMPT
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        return self.feature_dim + (7 if self.use_probs else 0)


def _torch():
    import torch

    return torch


def build_projector(cfg: FeatureVLMConfig, d_model: int, embed_rms: float = 1.0):
    """MLP projector (standardise → dropout → Linear → GELU → Linear → LayerNorm per visual token)."""
    torch = _torch()
    nn = torch.nn

    class FeatureProjector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n_tokens, self.d_model = cfg.n_visual_tokens, d_model
            # Standardiser fitted on the training features; stored with the weights.
            self.register_buffer("feature_mean", torch.zeros(cfg.input_dim))
            self.register_buffer("feature_std", torch.ones(cfg.input_dim))
            self.net = nn.Sequential(
                nn.Dropout(cfg.projector_dropout),
                nn.Linear(cfg.input_dim, cfg.projector_hidden),
                nn.GELU(),
                nn.Linear(cfg.projector_hidden, cfg.n_visual_tokens * d_model),
            )
            self.norm = nn.LayerNorm(d_model)
            # Start at the scale of the LLM's token embeddings, not unit variance (10x larger for SmolLM2).
            with torch.no_grad():
                self.norm.weight.fill_(embed_rms)

        def forward(self, x):
            x = (x.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
            z = self.net(x).view(x.shape[0], self.n_tokens, self.d_model)
            return self.norm(z)

    return FeatureProjector()


class FeatureVLM:
    """Base causal LM (optionally PEFT-wrapped) + feature projector; see the module docstring."""

    def __init__(self, lm: Any, tokenizer: Any, cfg: FeatureVLMConfig, projector: Any = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        ids = tokenizer.convert_tokens_to_ids(cfg.image_token)
        if not isinstance(ids, int) or ids == tokenizer.unk_token_id or ids in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            raise ValueError(f"image_token {cfg.image_token!r} must be one existing token distinct from pad/eos")
        self.image_token_id = int(ids)
        base = _base_model(lm)
        if projector is None:
            emb = base.get_input_embeddings().weight
            projector = build_projector(cfg, int(emb.shape[1]), float(emb.detach().float().pow(2).mean().sqrt()))
        projector.to(next(base.parameters()).device)
        # A submodule of the LLM: the trainer's optimiser, .to(device) and DDP/FSDP all see it.
        base.feature_projector = projector
        self._hook = base.get_decoder().register_forward_pre_hook(self._splice, with_kwargs=True)
        self.lm = lm

    # -- model plumbing

    @property
    def projector(self) -> Any:
        return _base_model(self.lm).feature_projector

    def set_lm(self, lm: Any) -> None:
        """Replace the LLM wrapper (e.g. after ``get_peft_model``); the decoder, hook and projector stay."""
        if _base_model(lm) is not _base_model(self.lm):
            raise ValueError("set_lm expects a wrapper of the same base model")
        self.lm = lm

    def _splice(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on the decoder: embed ``input_ids`` with the projected features at the placeholders."""
        feats = kwargs.pop("image_features", None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if feats is None or input_ids is None or not bool((input_ids == self.image_token_id).any()):
            return args, kwargs  # decoding steps after the prompt: nothing to splice
        return (), {**kwargs, "input_ids": None, "inputs_embeds": self.embed_inputs(input_ids, feats)}

    def embed_inputs(self, input_ids: Any, image_features: Any) -> Any:
        """Token embeddings of ``input_ids`` with the projected features in place of the image tokens.

        Rows without image tokens (text-only turns) keep their token embeddings."""
        base = _base_model(self.lm)
        embeds = base.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        rows = mask.any(dim=1)
        if not bool(rows.any()):
            return embeds
        counts = mask.sum(dim=1)
        if not bool((counts[rows] == self.cfg.n_visual_tokens).all()):
            raise ValueError(f"each prompt needs exactly {self.cfg.n_visual_tokens} image tokens, got {counts.tolist()}")
        visual = self.projector(image_features.to(embeds.device)).to(embeds.dtype)
        return embeds.masked_scatter(mask.unsqueeze(-1), visual[rows].reshape(-1, visual.shape[-1]))

    def features_input(self, features: np.ndarray, probs: np.ndarray | None = None):
        """(N, input_dim) float tensor from encoder features (and the classifier's probabilities)."""
        torch = _torch()
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if self.cfg.use_probs:
            if probs is None:
                raise ValueError("this describer was trained with the classifier's probabilities: pass probs=")
            p = np.asarray(probs, dtype=np.float32).reshape(len(x), -1)
            x = np.concatenate([x, p], axis=1)
        if x.shape[1] != self.cfg.input_dim:
            raise ValueError(f"expected {self.cfg.input_dim} input features, got {x.shape[1]}")
        return torch.from_numpy(x)

    def forward(self, input_ids, attention_mask=None, labels=None, image_features=None, **kwargs):
        """The LLM's forward with the projected features spliced in (loss when ``labels`` is given)."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, image_features=image_features, **kwargs)

    __call__ = forward

    # -- prompts

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the chat prompt (system + user turn with the image placeholders + assistant header)."""
        return encode_turn(self.tokenizer, self.cfg, question, None, self.image_token_id)[0]

    # -- generation

    def generate(
        self,
        features: np.ndarray,
        prompts: Sequence[str] | None = None,
        *,
        probs: np.ndarray | None = None,
        max_new_tokens: int = 96,
        batch_size: int = 16,
    ) -> list[str]:
        """Greedy answers, one per feature row (default prompt: the 7-point description)."""
        ids = self.generate_ids(features, prompts, probs=probs, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate_ids(
        self,
        features: np.ndarray,
        prompts: Sequence[str] | None = None,
        *,
        probs: np.ndarray | None = None,
        max_new_tokens: int = 96,
        batch_size: int = 16,
    ) -> list[list[int]]:
        """Greedy new token ids per feature row (generation runs on the spliced input embeddings)."""
        torch = _torch()
        x = self.features_input(features, probs)
        prompts = list(prompts) if prompts is not None else [self.cfg.describe_prompt] * len(x)
        if len(prompts) != len(x):
            raise ValueError(f"got {len(x)} feature rows but {len(prompts)} prompts")
        tok, lm = self.tokenizer, self.lm
        device = next(lm.parameters()).device
        was_training = lm.training
        lm.eval()
        out: list[list[int]] = []
        try:
            with torch.inference_mode():
                for c0 in range(0, len(x), batch_size):
                    seqs = [self.prompt_ids(p) for p in prompts[c0 : c0 + batch_size]]
                    width = max(map(len, seqs))
                    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
                    mask = torch.zeros((len(seqs), width), dtype=torch.long)
                    for r, s in enumerate(seqs):  # left padding: prompts end flush with the new tokens
                        ids[r, width - len(s) :] = torch.tensor(s)
                        mask[r, width - len(s) :] = 1
                    embeds = self.embed_inputs(ids.to(device), x[c0 : c0 + batch_size].to(device))
                    # From inputs_embeds, decoder-only generate returns the new tokens only.
                    gen = lm.generate(
                        inputs_embeds=embeds,
                        attention_mask=mask.to(device),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id,
                    )
                    for row in gen.tolist():
                        out.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
        finally:
            lm.train(was_training)
        return out

    # -- persistence

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write feature_vlm.json, projector.safetensors (fp16) and the PEFT adapter if there is one."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # fp16 halves the shipped size; the projector is loaded back as fp32.
        state = {k: v.detach().to("cpu").half().contiguous() for k, v in self.projector.state_dict().items()}
        save_file(state, str(out / PROJECTOR_NAME), metadata={"format": "pt"})
        if _is_peft(self.lm):
            self.lm.save_pretrained(str(out))
            _portable_adapter_config(out / "adapter_config.json", self.cfg.base_model)
        (out / CONFIG_NAME).write_text(json.dumps(asdict(self.cfg), indent=2))
        return out

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "float32", base_model_dir: str | None = None) -> FeatureVLM:
        """A saved describer around its base LLM (resolved through the registry unless ``base_model_dir``)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from models.backends.hf_llm import dtype_kwargs, locate_causal_lm

        path = Path(path)
        raw = json.loads((path / CONFIG_NAME).read_text())
        cfg = FeatureVLMConfig(**raw)
        where = base_model_dir or locate_causal_lm(cfg.base_model)
        tokenizer = AutoTokenizer.from_pretrained(where)
        lm = AutoModelForCausalLM.from_pretrained(where, **dtype_kwargs(dtype))
        vlm = cls(lm, tokenizer, cfg)
        state = {k: v.float() for k, v in load_file(str(path / PROJECTOR_NAME)).items()}
        vlm.projector.load_state_dict(state)
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            vlm.set_lm(PeftModel.from_pretrained(lm, str(path)))
        vlm.lm.to(device).eval()
        return vlm


def encode_turn(tokenizer: Any, cfg: FeatureVLMConfig, question: str, answer: str | None, image_token_id: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one chat turn; ``n_visual_tokens`` image tokens replace ``<image>``.

    Prompt and answer are tokenised separately, so training and generation see the same prompt tokens.
    The answer ids end with the end-of-turn token (the model learns to stop)."""
    messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": f"{IMAGE_MARKER}\n{question}"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, sep, tail = prompt.partition(IMAGE_MARKER)
    if not sep:
        raise ValueError("the chat template dropped the image marker")
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt_ids = enc(head) + [image_token_id] * cfg.n_visual_tokens + enc(tail)
    if answer is None:
        return prompt_ids, []
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template: the answer turn does not extend the generation prompt")
    # Drop the template's trailing newline after the end-of-turn token: nothing to learn there.
    return prompt_ids, enc(full[len(prompt) :].rstrip("\n"))


def _base_model(lm: Any) -> Any:
    return lm.get_base_model() if _is_peft(lm) else lm


def _is_peft(lm: Any) -> bool:
    return hasattr(lm, "peft_config") and hasattr(lm, "get_base_model")


def _portable_adapter_config(path: Path, base_model: str) -> None:
    # PEFT records the local cache directory of the base model; the registry id travels instead.
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(data, indent=2))
