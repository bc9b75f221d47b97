"""Training-step throughput and model FLOP utilisation of the pretraining methods.

Measures ``samples / s`` of one full training step (forward + backward + optimiser step, after warm-up steps) on a
synthetic random batch (there is no data split: the numbers describe compute only), for

* ``reference``: an MAE step written the way the ST-MEM code (github.com/bakqui/ST-MEM, ``models/st_mem.py``) writes
  it: hand-written attention (matmul + softmax), per-lead masking with ``repeat``-expanded gather indices, all
  tokens (SEP included) through the decoder embedding, the decoder run lead by lead in a Python loop over
  ``N + 2`` tokens (SEP tokens included), ``torch.optim.AdamW`` with its defaults (a for-loop over parameters on
  CPU);
* ``reference_onednn``: the same reference step with its float32 linear layers on oneDNN
  (:func:`ecgfm.accel.use_onednn_linears`): shows how much of ecgfm's lead comes from the GEMM library alone
  (float32 without ``--compile`` only: under bf16 autocast or ``torch.compile`` the linears take ``F.linear``,
  see :mod:`ecgfm.accel`, so this row would run the plain reference again and is skipped);
* ``mae_stmem``: :class:`~ecgfm.methods.mae.MAEModule` with the same configuration as the reference (per-lead
  masking, lead-wise decoder, 4 decoder heads): the comparison that keeps the math (only the decoder's unused
  SEP tokens are gone), with ecgfm's training defaults: fused AdamW and, on CPU, ``--cpu-linear`` (default
  ``auto``: float32 linears on oneDNN on non-Intel CPUs, see :mod:`ecgfm.accel`);
* ``mae``: MAEModule with ecgfm's defaults (global masking, joint decoder);
* ``crema``, ``simclr``, ``clocs``: the other methods on the same backbone.

Default configuration: ST-MEM ViT-S MAE (embed 384, depth 12, 6 heads, decoder 256 x 4, 12 leads x 2,250
samples, patch 75, mask 0.75, batch 8). FLOPs of one step (forward + backward, optimiser excluded) are counted with
:class:`torch.utils.flop_counter.FlopCounterMode`; the machine's dense matmul peak is measured in the same run by
timing a large matrix product with ``torch.matmul`` and ``F.linear`` (the op autocast's linears take), and on CPU
in float32 also the oneDNN inner product, the fastest counting (bfloat16 with ``--bf16``); MFU = FLOPs/step x
steps/s / peak. An MFU above 100 % means the peak was underestimated (the model's own products ran faster than
the timed ones) and is flagged in the output.
Throughput is samples / time over the timed steps (batch / mean step time, :func:`ecgfm.timing.rate_interval`;
not a mean of per-step rates, which overstates it when step times vary) with the 95 % t-interval of the mean step
time, inverted. All methods are built first and their timed steps are interleaved (round robin), so a
change of machine load during the run affects every method alike.

Examples::

    python scripts/bench_train.py --steps 3                        # quick CPU look
    python scripts/bench_train.py --device cuda --bf16 --size base --batch 256 --methods mae_stmem,mae,simclr
        # GPU samples/s and MFU (batch 8 leaves an H100 idle: use a GPU-sized batch; add --compile to fuse)
    python scripts/bench_train.py --methods reference,mae_stmem --steps 20 --out docs/bench_train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgfm.accel import (CPU_LINEAR_MODES, onednn_flop_formulas, onednn_linear_available,  # noqa: E402
                         resolve_cpu_linear, use_onednn_linears)
from ecgfm.backbones import create_backbone  # noqa: E402
from ecgfm.backbones.vit1d import sincos_1d  # noqa: E402
from ecgfm.timing import rate_interval  # noqa: E402

SIZES = {"test": "vit1d_test", "tiny": "vit1d_tiny", "small": "vit1d_small", "base": "vit1d_base"}
ALL_METHODS = ("reference", "reference_onednn", "mae_stmem", "mae", "crema", "simclr", "clocs")


# ====================================================================== reference (ST-MEM-style) MAE
class _RefAttention(nn.Module):
    """ST-MEM ``Attention``: qkv chunk, reshape to heads, explicit ``softmax(q k^T * scale) v``."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=True)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, self.dim_head).permute(0, 2, 1, 3)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (torch.matmul(q, k.transpose(-1, -2)) * self.scale).softmax(dim=-1)
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class _RefBlock(nn.Module):
    """ST-MEM ``TransformerBlock``: pre-norm attention and feed-forward, residuals."""

    def __init__(self, dim: int, hidden: int, heads: int, dim_head: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _RefAttention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x)) + x
        return self.ff(self.norm2(x)) + x


class ReferenceSTMEM(nn.Module):
    """The ST-MEM MAE (``models/st_mem.py``) re-typed without einops, same operations in the same order."""

    def __init__(self, seq_len: int, patch_size: int, num_leads: int, embed_dim: int, depth: int, heads: int,
                 dec_dim: int, dec_depth: int, dec_heads: int, mlp_ratio: float = 4, norm_pix_loss: bool = True,
                 dec_mlp_ratio: float = 4):
        super().__init__()
        self.p, self.n, self.num_leads, self.norm_pix_loss = patch_size, seq_len // patch_size, num_leads, norm_pix_loss
        self.to_patch_embedding = nn.Sequential(nn.LayerNorm(patch_size), nn.Linear(patch_size, embed_dim),
                                                nn.LayerNorm(embed_dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.n + 2, embed_dim), requires_grad=False)
        self.sep_embedding = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.lead_embeddings = nn.ParameterList(nn.Parameter(torch.randn(embed_dim) * 0.02) for _ in range(num_leads))
        self.blocks = nn.ModuleList(_RefBlock(embed_dim, int(mlp_ratio * embed_dim), heads, embed_dim // heads)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.to_decoder_embedding = nn.Linear(embed_dim, dec_dim)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.n + 2, dec_dim), requires_grad=False)
        # ST-MEM fixes dim_head = 64, which is width / heads for ViT-S/B (384/6, 768/12) and its decoder (256/4)
        self.decoder_blocks = nn.ModuleList(_RefBlock(dec_dim, int(dec_dim * dec_mlp_ratio), dec_heads, dec_dim // dec_heads)
                                            for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.decoder_head = nn.Linear(dec_dim, patch_size)
        with torch.no_grad():
            for table in (self.pos_embedding, self.decoder_pos_embed):
                d = table.shape[-1]
                table[0, 1:-1] = sincos_1d(self.n, d)  # SEP positions stay zero, as in ST-MEM

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        b, num_leads, n, d = x.shape
        len_keep = int(n * (1 - mask_ratio))
        noise = torch.rand(b, num_leads, n, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=2)
        ids_restore = torch.argsort(ids_shuffle, dim=2)
        ids_keep = ids_shuffle[:, :, :len_keep]
        x_masked = torch.gather(x, dim=2, index=ids_keep.unsqueeze(-1).repeat(1, 1, 1, d))
        mask = torch.ones([b, num_leads, n], device=x.device)
        mask[:, :, :len_keep] = 0
        mask = torch.gather(mask, dim=2, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, series: torch.Tensor, mask_ratio: float = 0.75) -> torch.Tensor:
        b, c, t = series.shape
        x = self.to_patch_embedding(series.reshape(b, c, self.n, self.p))      # all L x N patches embedded
        x = x + self.pos_embedding[:, 1:self.n + 1, :].unsqueeze(1)
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        sep = self.sep_embedding[None, None, None, :]
        left = sep.expand(b, c, -1, -1) + self.pos_embedding[:, :1, :].unsqueeze(1)
        right = sep.expand(b, c, -1, -1) + self.pos_embedding[:, -1:, :].unsqueeze(1)
        x = torch.cat([left, x, right], dim=2)
        n_sep = x.shape[2]
        leads = torch.stack([self.lead_embeddings[i] for i in range(c)]).unsqueeze(0)
        x = x + leads.unsqueeze(2).expand(b, -1, n_sep, -1)
        x = x.reshape(b, c * n_sep, -1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        # decoder
        x = self.to_decoder_embedding(x).reshape(b, c, n_sep, -1)
        d = x.shape[-1]
        mask_emb = self.mask_embedding.unsqueeze(1).repeat(b, c, self.n + 2 - n_sep, 1)
        x_wo_sep = torch.cat([x[:, :, 1:-1, :], mask_emb], dim=2)
        x_wo_sep = torch.gather(x_wo_sep, dim=2, index=ids_restore.unsqueeze(-1).repeat(1, 1, 1, d))
        x_wo_sep = x_wo_sep + self.decoder_pos_embed[:, 1:self.n + 1, :].unsqueeze(1)
        left = x[:, :, :1, :] + self.decoder_pos_embed[:, :1, :].unsqueeze(1)
        right = x[:, :, -1:, :] + self.decoder_pos_embed[:, -1:, :].unsqueeze(1)
        x = torch.cat([left, x_wo_sep, right], dim=2)
        decoded = []
        for i in range(c):
            x_lead = x[:, i, :, :]
            for blk in self.decoder_blocks:
                x_lead = blk(x_lead)
            decoded.append(self.decoder_head(self.decoder_norm(x_lead))[:, 1:-1, :])
        pred = torch.stack(decoded, dim=1)
        # loss
        target = series.reshape(b, c, self.n, self.p)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


# ====================================================================== harness
def make_batch(b: int, t: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(b, 12, t, generator=g), "x2": torch.randn(b, 12, t, generator=g),
             "lead_mask": torch.ones(b, 12, dtype=torch.bool), "patient": torch.arange(b),
             "index": torch.arange(b)}
    return {k: v.to(device) for k, v in batch.items()}


def build(method: str, args: argparse.Namespace) -> tuple[nn.Module, Callable[[dict], torch.Tensor], Any]:
    """Return ``(module, loss_fn(batch) -> loss, optimizer)`` on ``args.device``."""
    torch.manual_seed(0)
    vit_kw = dict(seq_len=args.seq_len, patch_size=args.patch_size)
    dec = dict(decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, mask_ratio=args.mask_ratio,
               warmup_steps=10, max_steps=10_000)
    if method in ("reference", "reference_onednn"):
        bb = create_backbone(SIZES[args.size], **vit_kw)  # only to read the size
        mlp_ratio = bb.blocks[0].mlp.fc1.out_features / bb.embed_dim if bb.depth else 4.0
        model = ReferenceSTMEM(args.seq_len, args.patch_size, 12, bb.embed_dim, bb.depth, bb.num_heads,
                               args.decoder_dim, args.decoder_depth, args.decoder_heads,
                               mlp_ratio=mlp_ratio).to(args.device)
        del bb
        if method == "reference_onednn":
            use_onednn_linears(model, "onednn")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        return model, lambda batch: model(batch["x"], args.mask_ratio), opt
    backbone = create_backbone(SIZES[args.size], **vit_kw)
    if method == "mae_stmem":
        from ecgfm.methods.mae import MAEModule
        module = MAEModule(backbone, decoder_heads=args.decoder_heads, mask_mode="per_lead",
                           decoder_layout="per_lead", **dec)
    elif method == "mae":
        from ecgfm.methods.mae import MAEModule
        module = MAEModule(backbone, decoder_heads=args.decoder_heads, **dec)
    elif method == "crema":
        from ecgfm.methods.crema import CREMAModule
        module = CREMAModule(backbone, decoder_heads=args.decoder_heads, **dec)
    elif method == "simclr":
        from ecgfm.methods.simclr import SimCLRModule
        module = SimCLRModule(backbone, fs=args.fs, warmup_steps=10, max_steps=10_000)
    elif method == "clocs":
        from ecgfm.methods.clocs import CLOCSModule
        module = CLOCSModule(backbone, mode="cmsc", warmup_steps=10, max_steps=10_000)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
    module = module.to(args.device).train()
    if not args.device.startswith("cuda"):
        use_onednn_linears(module, args.cpu_linear)  # as ecgfm.pipelines.train does on CPU
    opt = module.configure_optimizers()["optimizer"]  # AdamW, fused where PyTorch has it (ecgfm.accel.adamw_kwargs)
    return module, lambda batch: module.shared_step(batch)[0], opt


def count_flops(loss_fn: Callable, batch: dict, autocast) -> int:
    """FLOPs of forward + backward of one step (matmuls, convs, attention; elementwise ops are not counted).

    Counted with the math attention backend: FlopCounterMode has no formula for the CPU flash-attention kernel,
    and the math backend decomposes attention into the same matmuls (same FLOPs on every backend).
    """
    counter = FlopCounterMode(display=False, custom_mapping=onednn_flop_formulas())
    with counter, sdpa_kernel(SDPBackend.MATH):
        with autocast():
            loss = loss_fn(batch)
        loss.backward()
    return int(counter.get_total_flops())


def matmul_peak(device: str, dtype: torch.dtype, n: int, reps: int) -> float:
    """Measured dense matmul throughput (FLOP/s) of an ``n x n`` product (best of ``reps``).

    Every dtype and device times ``torch.matmul`` and ``F.linear`` (``a b^T``, the op the models' ``nn.Linear``
    layers run, under autocast too: on a CPU without native bfloat16 ``torch.matmul`` in bf16 takes a slow
    kernel while ``F.linear`` goes through oneDNN, several times faster). On CPU in float32 the oneDNN inner
    product of :mod:`ecgfm.accel` is timed as well. The fastest is the peak, so the GEMM path the model takes
    cannot inflate the MFU.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    products = [lambda: torch.matmul(a, b), lambda: torch.nn.functional.linear(a, b)]
    if device == "cpu" and dtype == torch.float32 and onednn_linear_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = math.inf
    for product in products:
        product()
        sync()
        for _ in range(reps):
            t0 = time.perf_counter()
            product()
            sync()
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class Runner:
    """One method's model, optimiser and timed training step."""

    def __init__(self, method: str, args: argparse.Namespace, batch: dict):
        self.method, self.args, self.batch = method, args, batch
        self.model, self.loss_fn, self.opt = build(method, args)
        self.params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.dev_type = "cuda" if args.device.startswith("cuda") else "cpu"
        self.step_loss = torch.compile(self.loss_fn) if args.compile else self.loss_fn
        self.flops = count_flops(self.loss_fn, batch, self.autocast)
        self.opt.zero_grad(set_to_none=True)
        self.times: list[float] = []

    def autocast(self):
        return torch.autocast(self.dev_type, dtype=torch.bfloat16) if self.args.bf16 else nullcontext()

    def sync(self) -> None:
        if self.dev_type == "cuda":
            torch.cuda.synchronize()

    def step(self) -> None:
        """forward + backward + optimiser step."""
        with self.autocast():
            loss = self.step_loss(self.batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.args.check_finite and not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{self.method}: non-finite loss")

    def timed_step(self) -> None:
        self.sync()
        t0 = time.perf_counter()
        self.step()
        self.sync()
        self.times.append(time.perf_counter() - t0)

    def result(self) -> dict[str, Any]:
        mean, lo, hi = rate_interval(self.args.batch, self.times)   # samples / time, not a mean of step rates
        return {"method": self.method, "params": self.params, "flops_per_step": self.flops, "samples_per_s": mean,
                "samples_per_s_ci95": [lo, hi], "step_s_median": statistics.median(self.times),
                "steps": len(self.times)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (MFU against the bf16 matmul peak)")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2250)
    ap.add_argument("--patch-size", type=int, default=75)
    ap.add_argument("--fs", type=float, default=250.0)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--decoder-dim", type=int, default=256)
    ap.add_argument("--decoder-depth", type=int, default=4)
    ap.add_argument("--decoder-heads", type=int, default=4, help="ST-MEM: 4 heads of 64")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--compile", action="store_true", help="torch.compile the loss computation")
    ap.add_argument("--cpu-linear", default="auto", choices=CPU_LINEAR_MODES,
                    help="float32 CPU linears of the ecgfm methods: oneDNN or ATen/MKL (default: auto, as training)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 2048 CPU / 8192 GPU)")
    ap.add_argument("--check-finite", action="store_true", help="check the loss every step (adds a sync)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    gpu = args.device.startswith("cuda")
    # ecgfm.accel routes linears to oneDNN only for float32 CPU tensors outside autocast and torch.compile
    onednn_off = args.bf16 or args.compile
    why_off = "on CUDA" if gpu else "under bf16 autocast" if args.bf16 else "under torch.compile"
    skipped = []
    if (gpu or onednn_off) and "reference_onednn" in methods:
        methods.remove("reference_onednn")
        skipped.append("reference_onednn")
    peak_n = args.peak_size or (8192 if gpu else 2048)
    peaks = {"float32": matmul_peak(args.device, torch.float32, peak_n, 5 if gpu else 3)}
    if args.bf16:
        peaks["bfloat16"] = matmul_peak(args.device, torch.bfloat16, peak_n, 5 if gpu else 3)
    peak = peaks["bfloat16" if args.bf16 else "float32"]
    ecgfm_onednn = not gpu and not onednn_off and resolve_cpu_linear(args.cpu_linear)
    device_name = torch.cuda.get_device_name(args.device) if gpu else platform.processor() or platform.machine()
    print(f"# bench_train: data = synthetic random batch (no split); device {args.device} ({device_name}), "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, dtype {'bf16 autocast' if args.bf16 else 'fp32'}"
          f"{', compiled' if args.compile else ''}"
          + ("" if gpu else f", CPU linears on F.linear (oneDNN path not used {why_off}; --cpu-linear "
                            f"{args.cpu_linear} has no effect)" if onednn_off
             else f", ecgfm CPU linears on {'oneDNN' if ecgfm_onednn else 'ATen/MKL'}"
                  f" (--cpu-linear {args.cpu_linear})"))
    if skipped:
        print(f"# reference_onednn skipped: its oneDNN linears are not used {why_off} "
              "(it would run the plain reference again)")
    print(f"# config: vit1d_{args.size}, 12 leads x {args.seq_len} samples, patch {args.patch_size}, mask "
          f"{args.mask_ratio}, decoder {args.decoder_dim} x {args.decoder_depth} ({args.decoder_heads} heads), "
          f"batch {args.batch}; {args.warmup} warm-up + {args.steps} timed steps")
    batch = make_batch(args.batch, args.seq_len, args.device)
    # All methods are built first and their timed steps interleaved (round robin), so that a change in the
    # machine's load during the run affects every method alike (the comparison is what matters).
    runners = [Runner(m, args, batch) for m in methods]
    for r in runners:
        for _ in range(args.warmup):
            r.step()
        r.sync()
    for _ in range(args.steps):
        for r in runners:
            r.timed_step()
    # the peak again after the timed steps (best of both), so a busy start does not inflate the MFU
    peaks = {k: max(v, matmul_peak(args.device, getattr(torch, k), peak_n, 5 if gpu else 3)) for k, v in peaks.items()}
    peak = peaks["bfloat16" if args.bf16 else "float32"]
    print("# measured matmul peak (" + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items())
          + f"; {peak_n}x{peak_n}, best of reps before and after the timed steps"
          + ("; best of torch.matmul and F.linear"
             + (" and, in float32, the oneDNN inner product)" if not gpu and onednn_linear_available() else ")")))
    results = []
    header = f"{'method':<16} {'params':>10} {'GFLOP/step':>11} {'samples/s':>10} {'95% CI':>19} {'MFU':>7}"
    print(header)
    for runner in runners:
        r = runner.result()
        r["mfu"] = r["flops_per_step"] * r["samples_per_s"] / args.batch / peak
        results.append(r)
        m = r["method"]
        lo, hi = r["samples_per_s_ci95"]
        print(f"{m:<16} {r['params']:>10,} {r['flops_per_step'] / 1e9:>11.1f} {r['samples_per_s']:>10.2f} "
              f"{f'[{lo:.2f}, {hi:.2f}]':>19} {100 * r['mfu']:>6.1f}%", flush=True)
    over = [r["method"] for r in results if r["mfu"] > 1]
    if over:
        print(f"# WARNING: MFU above 100 % ({', '.join(over)}): the measured peak is underestimated (these steps' "
              f"products ran faster than the timed {peak_n}x{peak_n} ones; try a larger --peak-size): the MFU "
              "column is not a utilisation here", flush=True)
    by = {r["method"]: r for r in results}
    summary: dict[str, Any] = {}
    if "reference" in by and "mae_stmem" in by:
        ref, ours = by["reference"], by["mae_stmem"]
        ratio = ours["samples_per_s"] / ref["samples_per_s"]
        lo = ours["samples_per_s_ci95"][0] / ref["samples_per_s_ci95"][1]
        hi = ours["samples_per_s_ci95"][1] / ref["samples_per_s_ci95"][0]
        summary["speedup_vs_reference"] = {"ratio": ratio, "range_from_ci95": [lo, hi],
                                           "flop_ratio": ours["flops_per_step"] / ref["flops_per_step"]}
        print(f"# mae_stmem / reference throughput: {ratio:.2f}x (target >= 1.2x; range from the two 95% CIs: "
              f"[{lo:.2f}, {hi:.2f}]); counted FLOPs ratio {ours['flops_per_step'] / ref['flops_per_step']:.3f}")
    if "reference_onednn" in by and "mae_stmem" in by:
        ref1, ours = by["reference_onednn"], by["mae_stmem"]
        ratio = ours["samples_per_s"] / ref1["samples_per_s"]
        summary["speedup_vs_reference_onednn"] = {"ratio": ratio}
        both = ("both with oneDNN linears" if ecgfm_onednn
                 else f"reference_onednn on oneDNN, mae_stmem on ATen/MKL by --cpu-linear {args.cpu_linear}")
        print(f"# mae_stmem / reference_onednn ({both}): {ratio:.2f}x; reference_onednn / "
              f"reference: {ref1['samples_per_s'] / by['reference']['samples_per_s']:.2f}x" if "reference" in by
              else f"# mae_stmem / reference_onednn: {ratio:.2f}x")
    report = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dtype": "bf16" if args.bf16 else "fp32", "compile": args.compile,
              "config": {k: v for k, v in vars(args).items() if k not in ("out",)}, "peaks_flops": peaks,
              "results": results, "summary": summary, "data": "synthetic random batch (no split)",
              "skipped": skipped, "mfu_above_peak": over}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
