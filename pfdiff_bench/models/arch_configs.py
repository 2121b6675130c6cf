"""The official constructor arguments of the full-size networks, as plain data (no torch import).

Kept apart from the network modules so that the checkpoint registry (``models/zoo.py``) and the commands
that only read it (``pfdiff-bench models list``, ``reproduce --dry-run``) start without importing torch;
each network module re-exports its own configurations under the names it always had.
"""

# ------------------------------------------------------------------ ddpm_unet
#: Full-size configurations (ddim ``configs/cifar10.yml`` and ``bedroom.yml`` = ``church.yml``).
CIFAR10_CONFIG = dict(in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2,
                      attn_resolutions=[16], dropout=0.1, resamp_with_conv=True, image_size=32)
LSUN_CONFIG = dict(in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2,
                   attn_resolutions=[16], dropout=0.0, resamp_with_conv=True, image_size=256)

# ------------------------------------------------------------------ adm_unet
#: Full-size ImageNet 64x64 class-conditional model (``64x64_diffusion.pt``, README flags).
IMAGENET64_CONFIG = dict(
    image_size=64, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3,
    attention_resolutions=[2, 4, 8], dropout=0.1, channel_mult=[1, 2, 3, 4], conv_resample=True,
    dims=2, num_classes=1000, use_checkpoint=False, use_fp16=True, num_heads=4, num_head_channels=64,
    num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
)

#: Full-size ImageNet 256x256 class-conditional model (``256x256_diffusion.pt``, README "256x256 model"
#: flags; CHECKPOINTS.md addendum §B). Unlike the 64-px model it keeps the legacy (heads-first) q/k/v order
#: and has no dropout flag.
IMAGENET256_CONFIG = dict(
    image_size=256, in_channels=3, model_channels=256, out_channels=6, num_res_blocks=2,
    attention_resolutions=[8, 16, 32], dropout=0.0, channel_mult=[1, 1, 2, 2, 4, 4], conv_resample=True,
    dims=2, num_classes=1000, use_checkpoint=False, use_fp16=True, num_heads=4, num_head_channels=64,
    num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
)

# ------------------------------------------------------------------ adm_classifier
#: Full-size ImageNet 64x64 noisy classifier (``64x64_classifier.pt``, README flags).
CLASSIFIER64_CONFIG = dict(
    image_size=64, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=4,
    attention_resolutions=[2, 4, 8], dropout=0, channel_mult=[1, 2, 3, 4], conv_resample=True, dims=2,
    use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=64, num_heads_upsample=-1,
    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False, pool="attention",
)

#: Full-size ImageNet 256x256 noisy classifier (``256x256_classifier.pt``: ``classifier_defaults()`` at
#: image_size 256, i.e. width 128, depth 2; CHECKPOINTS.md addendum §B).
CLASSIFIER256_CONFIG = dict(
    image_size=256, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=2,
    attention_resolutions=[8, 16, 32], dropout=0, channel_mult=[1, 1, 2, 2, 4, 4], conv_resample=True, dims=2,
    use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=64, num_heads_upsample=-1,
    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False, pool="attention",
)

# ------------------------------------------------------------------ ncsnpp
#: Full-size DDPM++ deep, continuous VP, CIFAR-10 (``checkpoint_8.pth``; manifest ``ncsnpp_cifar10_deep``).
CIFAR10_DDPMPP_DEEP_CONFIG = dict(
    image_size=32, num_channels=3, centered=True, nf=128, ch_mult=[1, 2, 2, 2], num_res_blocks=8,
    attn_resolutions=[16], dropout=0.1, resamp_with_conv=True, conditional=True, fir=False,
    fir_kernel=[1, 3, 3, 1], skip_rescale=True, resblock_type="biggan", progressive="none",
    progressive_input="none", progressive_combine="sum", embedding_type="positional", fourier_scale=16,
    init_scale=0.0, nonlinearity="swish", scale_by_sigma=False, sigma_min=0.01, sigma_max=50, num_scales=1000,
    continuous=True,
)
