"""Tiny random-init checkpoints with the real architectures, for offline tests, the ``:tiny`` config and demos.

Each builder instantiates the same classes as the real checkpoint (diffusers ``StableAudioPipeline`` parts:
``StableAudioDiTModel``, ``AutoencoderOobleck``, ``StableAudioProjectionModel``, ``T5EncoderModel`` with a
``T5Tokenizer`` trained here with `tokenizers`, the real ``CosineDPMSolverMultistepScheduler`` config;
transformers ``ClapModel`` + ``ClapProcessor``; ``ASTModel`` + ``ASTFeatureExtractor``) at toy sizes with
fixed seeds, and ``save_pretrained``s them, so the sidecar loads them through exactly the code path a real
checkpoint takes. Nothing is downloaded.

    python -m audio_gen.tiny [--root DIR]      # builds (or finds) all of them and prints their directories

`ensure_tiny_checkpoint(name)` builds into ``$ITH_JAX_CACHE/tiny/v<N>/<name>`` (default
``~/.cache/ith_jax``) once: it builds in a temporary sibling directory and renames it into place, so an
interrupted or concurrent build never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import uuid

from ith_common.errors import UserError, run_main

# Bump when a builder changes, so old tiny checkpoints are not reused with new expectations.
TINY_FORMAT_VERSION = 1
TINY_NAMES = ("stable_audio", "clap_fused", "clap_unfused", "ast")

# Tiny Stable Audio: 16 kHz stereo, hop 256 samples per latent frame, a 128-frame (2.05 s) latent window,
# so a 1 s request needs 63 frames and the short-latent mode has something to save.
TINY_STABLE_AUDIO = dict(sampling_rate=16000, downsampling_ratios=[4, 8, 8], latent_channels=8, sample_size=128)

# A little text the tiny tokenizers are trained on; it covers the words the tests and demos use.
_CORPUS = """
dog barking sound. a cat meows softly. bird chirping in the morning. the roar of a lion.
cow mooing sound. a horse neighs. sheep bleating. pig oink sound. duck quacking loudly. frog croaking.
a high pitched whistle. a low pitched hum. violin playing a high note. tuba playing a low note.
thunder rumbling. rain falling on a roof. car engine sound. a bell ringing. footsteps on wood.
the squeal of a mouse. a rooster crowing at dawn. wolf howling at night. bee buzzing. owl hooting.
piano melody sound. drum beat sound. siren wailing. glass breaking. water dripping. wind blowing.
Low quality. high quality audio. a chirp, a tweet, a roar, a bark, a hiss, a growl, a purr, a buzz.
elephant trumpeting. snake hissing. monkey screeching. goat bleat. donkey bray. crow caw. whale song.
"""


def tiny_root() -> pathlib.Path:
    base = os.environ.get("ITH_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ith_jax")
    return pathlib.Path(base) / "tiny" / f"v{TINY_FORMAT_VERSION}"


def ensure_tiny_checkpoint(name: str, root: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory of tiny checkpoint `name`, building it first if it is not there yet."""
    if name not in TINY_NAMES:
        raise UserError(f"unknown tiny checkpoint tiny:{name}; expected one of "
                        + ", ".join(f"tiny:{n}" for n in TINY_NAMES))
    root = pathlib.Path(root) if root is not None else tiny_root()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}-",
                                            dir=root))
    try:
        BUILDERS[name](staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the finished checkpoint is for every user
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():  # not "someone else finished first": a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def ensure_all(root: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    return {name: ensure_tiny_checkpoint(name, root) for name in TINY_NAMES}


# ----------------------------------------------------------------------------------------------- tokenizers

def _corpus_lines() -> list[str]:
    return [line.strip() for line in _CORPUS.replace(". ", ".\n").splitlines() if line.strip()]


def train_t5_tokenizer(vocab_size: int = 160):
    """A T5 (SentencePiece-Unigram-style) fast tokenizer trained on the small corpus; T5's id layout."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5Tokenizer

    trainer_tokenizer = Tokenizer(Unigram())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer_tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # T5 puts <pad>=0, </s>=1, <unk>=2 first; the trainer places special tokens in this order.
    trainer = UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                             show_progress=False)
    trainer_tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(trainer_tokenizer.to_str())["model"]["vocab"]]
    # The real tokenizer has 100 <extra_id_*> sentinels; 4 keep the same structure at toy size.
    return T5Tokenizer(vocab=vocab, extra_ids=4, model_max_length=32)


def train_roberta_tokenizer(vocab_size: int = 300):
    """A RoBERTa byte-level BPE tokenizer (CLAP's text side) trained on the small corpus; RoBERTa's id layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from tokenizers.trainers import BpeTrainer
    from transformers import RobertaTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus_lines(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return RobertaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=64)


# ----------------------------------------------------------------------------------------------- builders

def build_tiny_stable_audio(out_dir: str | os.PathLike, seed: int = 0) -> None:
    import torch
    from diffusers import (AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel,
                           StableAudioPipeline)
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    spec = TINY_STABLE_AUDIO
    tokenizer = train_t5_tokenizer()
    torch.manual_seed(seed)
    text_dim, cond_dim = 32, 32
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    projection_model = StableAudioProjectionModel(text_encoder_dim=text_dim, conditioning_dim=cond_dim,
                                                  min_value=0, max_value=512)
    transformer = StableAudioDiTModel(
        sample_size=spec["sample_size"], in_channels=spec["latent_channels"], num_layers=2, attention_head_dim=16,
        num_attention_heads=2, num_key_value_attention_heads=1, out_channels=spec["latent_channels"],
        cross_attention_dim=cond_dim, time_proj_dim=16, global_states_input_dim=2 * cond_dim,
        cross_attention_input_dim=cond_dim)
    vae = AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=spec["downsampling_ratios"],
                             channel_multiples=[1, 2, 4, 4], decoder_channels=8,
                             decoder_input_channels=spec["latent_channels"], audio_channels=2,
                             sampling_rate=spec["sampling_rate"])
    # The real checkpoint's scheduler configuration, unchanged.
    scheduler = CosineDPMSolverMultistepScheduler(
        sigma_min=0.3, sigma_max=500, sigma_data=1.0, sigma_schedule="exponential", num_train_timesteps=1000,
        solver_order=2, prediction_type="v_prediction", rho=7.0, solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, final_sigmas_type="zero")
    pipeline = StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection_model,
                                   tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)
    pipeline.save_pretrained(out_dir)


def build_tiny_clap(out_dir: str | os.PathLike, *, fused: bool, seed: int = 0) -> None:
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    tokenizer = train_roberta_tokenizer()
    torch.manual_seed(seed)
    # Audio: the real 64 mel bins (the extractor's fusion path hard-codes 64), spec_size 128 (freq_ratio 2;
    # the real 256 gives 4), two Swin stages; 2 s windows at 16 kHz stand in for the real 10 s at 48 kHz
    # (the same code paths, 1/15 of the samples).
    config = ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, projection_dim=16),
        audio_config=dict(spec_size=128, num_mel_bins=64, patch_size=4, patch_stride=[4, 4], patch_embeds_hidden_size=16,
                          depths=[1, 1], num_attention_heads=[2, 2], window_size=4, hidden_size=32,
                          enable_fusion=fused, projection_dim=16, hidden_dropout_prob=0.0),
        projection_dim=16)
    model = ClapModel(config).eval()
    feature_extractor = ClapFeatureExtractor(
        feature_size=64, sampling_rate=16000, hop_length=160, max_length_s=2, fft_window_size=512,
        frequency_min=50, frequency_max=8000, truncation="fusion" if fused else "rand_trunc", padding="repeatpad")
    ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    model.save_pretrained(out_dir)


def build_tiny_ast(out_dir: str | os.PathLike, seed: int = 0) -> None:
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(seed)
    # 32 mel bins x 200 frames (2 s at the real 10 ms hop), 8x8 patches with stride 8: 4 x 24 patches.
    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, frequency_stride=8, time_stride=8, max_length=200, num_mel_bins=32)
    ASTModel(config).eval().save_pretrained(out_dir)
    ASTFeatureExtractor(num_mel_bins=32, max_length=200, sampling_rate=16000).save_pretrained(out_dir)


BUILDERS = {
    "stable_audio": build_tiny_stable_audio,
    "clap_fused": lambda out: build_tiny_clap(out, fused=True),
    "clap_unfused": lambda out: build_tiny_clap(out, fused=False),
    "ast": build_tiny_ast,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help=f"where to build (default {tiny_root()})")
    args = parser.parse_args(argv)
    for name, path in ensure_all(args.root).items():
        print(f"tiny:{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
