"""Embedded tiny pipelines: real diffusers/transformers classes, small configs, random weights, a byte-level
tokenizer built in memory. Nothing is downloaded; they run anywhere in seconds and exercise the same attention
code as the full models (what the demo, the CPU tests and the GPU benchmark's smoke run use)."""
from __future__ import annotations

import torch

# Byte-level vocabulary: every string tokenizes, no files needed.
_SPECIALS = ["<pad>", "</s>", "<unk>"]


def tiny_tokenizer(model_max_length: int = 32):
    """A fast tokenizer over the 256 byte symbols (+ pad, eos, unk), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


TINY_WAN = dict(
    transformer=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                     out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64),
    vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
             latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    text_encoder=dict(vocab_size=259, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0),
)
# what the embedded pipeline needs from generate(): text length, sizes it was built for
TINY_WAN_TEXT_LEN = 64


def tiny_wan_pipeline(seed: int = 0, dtype=torch.float32, two_stage: bool = False, num_layers: int | None = None):
    """A Wan 2.1-style text-to-video pipeline (WanPipeline) with random weights. two_stage=True adds a second
    transformer like Wan 2.2 (boundary_ratio=0.5)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        tcfg = dict(TINY_WAN["transformer"])
        if num_layers is not None:
            tcfg["num_layers"] = num_layers
        transformer = WanTransformer3DModel(**tcfg)
        transformer_2 = WanTransformer3DModel(**tcfg) if two_stage else None
        vae = AutoencoderKLWan(**TINY_WAN["vae"])
        text_encoder = UMT5EncoderModel(UMT5Config(**TINY_WAN["text_encoder"]))
    pipe = WanPipeline(tokenizer=tiny_tokenizer(TINY_WAN_TEXT_LEN), text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer.eval(),
                       transformer_2=transformer_2.eval() if transformer_2 is not None else None,
                       boundary_ratio=0.5 if two_stage else None)
    for t in (pipe.transformer, pipe.transformer_2):
        if t is not None:
            cast_keeping_fp32(t, dtype)
    pipe._comfy_sage_family = "tiny-wan"
    return pipe


def cast_keeping_fp32(model, dtype):
    """model.to(dtype) except the modules the model class keeps in fp32 (norms, time embedding, rope), as
    `from_pretrained(torch_dtype=...)` does."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(dtype)
    for name, b in model.named_buffers():
        if b.is_floating_point() and not any(k in name.split(".") for k in keep):
            b.data = b.data.to(dtype)
    return model


TINY_FLUX_TEXT_LEN = 64


def tiny_flux_pipeline(seed: int = 0, dtype=torch.float32):
    """A Flux-style text-to-image pipeline (FluxPipeline) with random weights: 1 double + 1 single block."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=32, shift_factor=0.0,
                            scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=TINY_FLUX_TEXT_LEN,
                                            projection_dim=32, pad_token_id=0, eos_token_id=1, bos_token_id=1))
        t5 = T5EncoderModel(T5Config(vocab_size=259, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=clip.eval(),
                        tokenizer=tiny_tokenizer(TINY_FLUX_TEXT_LEN), text_encoder_2=t5.eval(),
                        tokenizer_2=tiny_tokenizer(TINY_FLUX_TEXT_LEN), transformer=transformer.eval())
    cast_keeping_fp32(pipe.transformer, dtype)
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.to(dtype)
    pipe._comfy_sage_family = "tiny-flux"
    return pipe
