"""Write a prior's model card (markdown) from its config and an ``evaluate-prior`` report."""

from __future__ import annotations

from typing import Any

from klip_med.priors.config import PriorConfig


def _loss_table(loss_rows: list[tuple[int, float]], every: int = 1000) -> str:
    lines = ["| steps | mean training loss (eps MSE) |", "|---|---|"]
    for lo in range(0, max(s for s, _ in loss_rows), every):
        seg = [v for s, v in loss_rows if lo < s <= lo + every]
        if seg:
            lines.append(f"| {lo + 1}-{min(lo + every, loss_rows[-1][0])} | {sum(seg) / len(seg):.5f} |")
    return "\n".join(lines)


def render_model_card(config: PriorConfig, report: dict[str, Any], loss_rows: list[tuple[int, float]],
                      command: str, notes: str = "") -> str:
    """Markdown model card. ``report`` is the JSON ``klip-med evaluate-prior`` writes."""
    t = config.training
    s = t.get("settings", {})
    arch = config.architecture
    n_params = report.get("n_parameters")
    den = "\n".join(
        f"| {r['t']} | {r['sigma']} | {r['x0_mse']:.5f} | {r['eps_mse']:.4f} |" for r in report["denoising"]
    )
    rec = "\n".join(
        f"| `{r['physics']}` | {r['psnr_posterior_mean']:.2f} dB / {r['ssim_posterior_mean']:.3f} | "
        f"{r['psnr_baseline']:.2f} dB / {r['ssim_baseline']:.3f} | "
        f"{r['psnr_posterior_mean'] - r['psnr_baseline']:+.2f} dB | {r['seconds']} s |"
        for r in report["reconstruction"]
    )
    intensity = config.intensity.to_dict()
    return f"""# Model card: `{config.name}`

{config.description}

## Model
- MONAI `DiffusionModelUNet` (2D, channels {arch['channels']}, {arch.get('num_res_blocks', 2)} residual blocks per
  level, attention at levels {arch['attention_levels']}){f', {n_params / 1e6:.2f} M parameters' if n_params else ''};
  epsilon prediction; MONAI DDPM schedule `{config.schedule['schedule']}` beta
  {config.schedule['beta_start']} to {config.schedule['beta_end']} over {config.schedule['num_train_timesteps']} steps.
- Image size {config.image_size}x{config.image_size}, one channel, working range [-1, 1].
- Intensity rule: `{intensity}` (see `klip_med/priors/intensity.py`).
- Weights: `weights.safetensors` ({config.weights_dtype}, the EMA weights, decay {s.get('ema_decay')}); loaded as float32.

## Data
- Manifest `{t.get('manifest')}` (`data_manifests/{t.get('manifest_file')}`, sha256 `{t.get('manifest_sha256')}`),
  split `{t.get('split')}`: {t.get('n_slices')} slices from {len(t.get('files', []))} file(s); every file's
  checksum is in `config.json`.
- Licence of the training data (binds this prior): {t.get('licence')}

## Training
- `klip-med train` for {t.get('steps_trained')} optimiser steps at batch {s.get('batch_size')} (stopped by its time
  limit; nominal schedule length {s.get('steps')})
  (AdamW, lr {s.get('lr')} with {s.get('warmup_steps')} warm-up steps, then
  {'constant' if s.get('final_lr_fraction') == 1 else 'cosine decay'}; {t.get('mixed_precision')});
  augmentation: flips {s.get('flip_lr')}, rotation +-{s.get('rotate_deg')} deg, zoom +-{s.get('scale_jitter')},
  gain +-{s.get('gain_jitter')}, offset +-{s.get('offset_jitter')}; seed {s.get('seed')}.
- Trained {t.get('steps_trained')} steps in {t.get('train_seconds')} s on {t.get('device')} (torch {t.get('torch')}).
- Final training loss (mean of the last 1000 steps): {t.get('final_loss'):.5f}.

{_loss_table(loss_rows)}

## Evaluation on held-out healthy slices
{len(report['slices'])} lesion-free held-out slices (dev + test splits, evenly spaced, >= 30% anatomy):
{', '.join(report['slices'])}.

Denoising error of the one-step estimate x0_hat at training timestep t (sigma: canonical noise level,
[-1, 1] units):

| t | sigma | x0 MSE | eps MSE |
|---|---|---|---|
{den}

Posterior mean of the fast sampler ({report['reconstruction'][0]['sampler'] if report['reconstruction'] else ''},
{report['reconstruction'][0]['samples'] if report['reconstruction'] else ''} samples) against the measurement-domain
baseline (zero-filled MRI / FBP CT), PSNR / SSIM on [0, 1]-scaled images:

| physics | posterior mean | baseline | gain | time ({report['device']}) |
|---|---|---|---|---|
{rec}

Reproduce:

```bash
{command}
```

`samples.png`: real held-out slices (top) and unconditional samples of this prior (bottom).

## Limitations
{notes}
"""
