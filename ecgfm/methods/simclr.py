"""SimCLR for ECGs (Chen et al. 2020; applied to 12-lead ECGs by Mehari & Strodthoff 2022).

Two augmented views of every crop are encoded by the backbone, projected by an MLP head and pulled together with
NT-Xent against the other ``2N - 2`` embeddings of the (DDP-global) batch.

Optional pretext regression (``aux_targets="handcrafted"``): a linear head on the backbone embedding of every view
regresses record-level rhythm and morphology statistics computed from the signal
(:func:`ecgfm.evaluate.handcrafted.pretext_targets`, batch key ``t``), with weight ``aux_weight`` beside NT-Xent.
With ``aux_targets="handcrafted_crop"`` the rhythm statistics are those of each view's own beats
(:class:`ecgfm.evaluate.handcrafted.CropRhythmTargets`: ``t`` of the first view, ``t2`` of the second).
The targets use no label; they ask the encoder to keep beat timing, which augmentation invariance alone may wash
out (MaskFeat's HOG targets are the image counterpart: Wei et al. 2022).

Augmentation randomness: with ``aug_seed=None`` the augmentations draw from torch's global generator, which the
training pipeline reseeds from ``(seed, rank, step)`` before every step (:class:`ecgfm.train.loop.StepSeedCallback`),
so a resumed run draws what an uninterrupted one would. With a fixed ``aug_seed`` the module keeps its own
generator per rank; its state (one ``uint8`` tensor per rank, from :meth:`torch.Generator.get_state`) is saved in
the checkpoint under :data:`AUG_STATE_KEY` and restored on load, with the same effect. With gradient accumulation a
checkpoint written inside a window resumes at the window's start
(:class:`ecgfm.train.loop.AccumulationWindowCheckpoint`), so the module also keeps the generator's state at every
window's first micro-batch and saves that one for such a checkpoint (:meth:`SimCLRModule.on_checkpoint_set_back`):
the replayed micro-batches draw the same views again.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecgfm.augment import make_generator, simclr_augment
from ecgfm.heads import ProjectionHead
from ecgfm.losses.contrastive import ddp_mean, gather_counts, nt_xent, world_info
from ecgfm.losses.regression import masked_target_mse
from ecgfm.methods.base import PretrainModule, rows_only

__all__ = ["SimCLRModule", "AUG_STATE_KEY", "AUX_TARGETS", "signal_views"]

#: pretext targets a SimCLR run may regress besides NT-Xent (``aux_targets``)
AUX_TARGETS = ("handcrafted", "handcrafted_crop")

#: checkpoint entry holding the training augmentation generators: ``{"aug_seed": int, "device_type": str,
#: "states": [uint8 tensor per rank]}`` (plain data and tensors: loads with ``weights_only=True``)
AUG_STATE_KEY = "simclr_aug_generator"


def signal_views(x: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` bool: whether each crop of ``x (B, L, T)`` holds a non-zero sample on a present lead of ``lead_mask
    (B, L)`` (``None``: every lead). False for the all-zero ``x2`` of ``PretrainDataModule(views="adjacent")`` for a
    record no longer than a crop (zero padding): such views of different records are identical, each other's
    perfect matches. The test :class:`~ecgfm.methods.clocs.CLOCSModule` applies to its views."""
    if lead_mask is not None:
        x = x * lead_mask.to(x.dtype)[:, :, None]
    return x.ne(0).flatten(1).any(1)


def view_lead_masks(views: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
    """The leads each augmented view still has: ``lead_mask (N, L)`` without the leads its augmentation zeroed
    (:class:`~ecgfm.augment.PresentLeadMask`, :class:`~ecgfm.augment.KeepOneLead` run last, so a zeroed lead is an
    all-zero row of ``views (N, L, T)``). A lead-aware encoder then makes no tokens for them, as it sees such a
    record downstream; a view left with no lead keeps its record's mask."""
    m = lead_mask & (views != 0).any(dim=-1)
    empty = ~m.any(dim=1)
    return torch.where(empty[:, None], lead_mask, m)


class SimCLRModule(PretrainModule):
    """SimCLR pretraining of ``backbone`` on :class:`~ecgfm.data.datamodules.PretrainDataModule` batches.

    Args:
        backbone: encoder (``embed(x) -> (B, D)``, ``num_features``).
        proj_dim: projection (loss) dimension.
        proj_hidden: hidden width of the projection head.
        proj_layers: linear layers in the projection head.
        temperature: NT-Xent temperature.
        fs: sampling rate of the batches (Hz), for the augmentations; checked against the datamodule's ``fs`` when
            a fit starts (:meth:`on_fit_start`).
        crop_scale: resized-crop window fraction range.
        p_crop: probability of the resized crop.
        noise_snr_db: Gaussian-noise SNR range (dB).
        p_noise: probability of Gaussian noise.
        p_amplitude: probability of the amplitude scale.
        p_wander: probability of baseline wander.
        p_powerline: probability of powerline noise.
        p_time_mask: probability of the time mask.
        p_lead_mask: probability of masking some present leads.
        p_one_lead: probability that a view of a multi-lead record keeps lead I alone
            (:class:`~ecgfm.augment.KeepOneLead`; each view draws its own).
        p_lowpass: probability of the random low-pass filter.
        aug_seed: seed of the augmentation generator (rank ``r`` uses ``aug_seed + 1000 r``; validation always
            restarts from its own seed, so validation losses are comparable between epochs; the training
            generator's state travels in checkpoints); ``None`` draws training views from torch's global generator
            (validation views still come from a fixed generator, seeded as for ``aug_seed=0``).
        lead_aware: for backbones whose ``embed`` takes ``lead_mask`` (ViT-1D), encode only the record's present
            leads (as frozen features and fine-tuning see them downstream; a one-lead record costs ~1/12).
            False: absent leads are encoded as zero leads.
        aux_targets: ``None`` (plain SimCLR), ``"handcrafted"`` or ``"handcrafted_crop"``: also regress the batch's
            pretext targets ``t (B, aux_dim)`` (and ``t2`` of the second view, when the batch has it) from each
            view's backbone embedding with a linear head (the training pipeline computes the targets and passes
            ``aux_dim``; ``_crop``: rhythm columns from each view's own beats, morphology from its record).
        aux_dim: number of pretext targets (required with ``aux_targets``).
        aux_weight: weight of the regression loss (:func:`~ecgfm.losses.masked_target_mse`) beside NT-Xent.
        contrastive_weight: weight of NT-Xent; 0 (only with ``aux_targets``) trains on the pretext regression
            alone, the ablation that tells what the contrastive task adds (NT-Xent is still logged).
        lr, weight_decay, warmup_steps, max_steps, betas, probe_num_classes, probe_multilabel: see
            :class:`~ecgfm.methods.base.PretrainModule`.
    """

    min_val_batch = 2   # a contrastive loss of one record has no negative (base.PretrainModule)

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, proj_hidden: int = 512, proj_layers: int = 2,
                 temperature: float = 0.1, fs: float = 100.0, crop_scale: tuple[float, float] = (0.5, 1.0),
                 p_crop: float = 0.8, noise_snr_db: tuple[float, float] = (10.0, 30.0), p_noise: float = 0.8,
                 p_amplitude: float = 0.5, p_wander: float = 0.5, p_powerline: float = 0.3,
                 p_time_mask: float = 0.5, p_lead_mask: float = 0.5, p_lowpass: float = 0.3,
                 aug_seed: int | None = 0, lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 100,
                 max_steps: int = 10000, betas: tuple[float, float] = (0.9, 0.95),
                 probe_num_classes: int | None = None, probe_multilabel: bool = False,
                 lead_aware: bool = True, aux_targets: str | None = None, aux_dim: int | None = None,
                 aux_weight: float = 1.0, contrastive_weight: float = 1.0, p_one_lead: float = 0.0) -> None:
        super().__init__(backbone, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         max_steps=max_steps, betas=betas, probe_num_classes=probe_num_classes,
                         probe_multilabel=probe_multilabel)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.lead_aware = bool(lead_aware)
        self.projector = ProjectionHead(int(backbone.num_features), proj_hidden, proj_dim, num_layers=proj_layers)
        if aux_targets is not None and aux_targets not in AUX_TARGETS:
            raise ValueError(f"aux_targets must be None or one of {AUX_TARGETS}, got {aux_targets!r}")
        if aux_targets is not None and (aux_dim is None or int(aux_dim) < 1 or not float(aux_weight) > 0):
            raise ValueError(f"aux_targets={aux_targets!r} needs aux_dim >= 1 and aux_weight > 0, got aux_dim="
                             f"{aux_dim}, aux_weight={aux_weight}")
        if not float(contrastive_weight) >= 0 or (float(contrastive_weight) == 0 and aux_targets is None):
            raise ValueError(f"contrastive_weight must be > 0, or 0 with aux_targets (nothing else to learn), got "
                             f"{contrastive_weight}")
        if aux_targets is not None and float(p_crop) > 0:
            warnings.warn(f"aux_targets={aux_targets!r} with p_crop={p_crop}: a resized crop stretches a view in time, "
                          "so its RR / heart-rate targets no longer describe what the encoder sees (the recipes set "
                          "method.p_crop=0)", stacklevel=2)
        self.aux_targets, self.aux_weight = aux_targets, float(aux_weight)
        self.contrastive_weight = float(contrastive_weight)
        self.aux_head = None if aux_targets is None else nn.Linear(int(backbone.num_features), int(aux_dim))
        self.augment = simclr_augment(fs=fs, crop_scale=tuple(crop_scale), p_crop=p_crop,
                                      noise_snr_db=tuple(noise_snr_db), p_noise=p_noise, p_amplitude=p_amplitude,
                                      p_wander=p_wander, p_powerline=p_powerline, p_time_mask=p_time_mask,
                                      p_lead_mask=p_lead_mask, p_lowpass=p_lowpass, p_one_lead=p_one_lead)
        self.aug_seed = aug_seed
        self._gens: dict[str, torch.Generator] = {}
        self._restored_aug_state: dict[str, Any] | None = None  # from on_load_checkpoint, until first use
        # (batch_progress.total.processed, training generator state) at the current accumulation window's first
        # micro-batch, and the checkpoint (its id) that on_checkpoint_set_back set back to the window starting there
        self._window_aug_state: tuple[int, torch.Tensor] | None = None
        self._set_back: tuple[int, int] | None = None

    def _rank_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The views' RNG: in training the seeded one (``aug_seed``) or the global RNG; in evaluation always a fixed
        one (reset every validation epoch), so that validation losses compare between epochs even without
        ``aug_seed`` (the global RNG, reseeded from the step, drew other views each epoch)."""
        if self.training:
            return None if self.aug_seed is None else self._generator_for("train", device)
        return self._generator_for("val", device)

    def _generator_for(self, key: str, device: torch.device) -> torch.Generator:
        gen = self._gens.get(key)
        if gen is None or gen.device != device:
            rank, world = self._rank_world()
            seed = int(self.aug_seed or 0) + 1000 * rank + (0 if key == "train" else 999_983)
            gen = self._gens[key] = make_generator(seed, device)
            if key == "train" and self._restored_aug_state is not None:
                self._apply_restored_state(gen, rank, world)
        return gen

    def _apply_restored_state(self, gen: torch.Generator, rank: int, world: int) -> None:
        """Set the training generator to the state saved in the checkpoint (once), or warn why not."""
        saved, self._restored_aug_state = self._restored_aug_state, None
        states = saved["states"]
        problem = None
        if saved["aug_seed"] != self.aug_seed:
            problem = f"it was saved with aug_seed={saved['aug_seed']}, this run uses aug_seed={self.aug_seed}"
        elif saved["device_type"] != gen.device.type:
            problem = f"it is a {saved['device_type']} generator state, this run draws on {gen.device.type}"
        elif len(states) != world:
            problem = f"it holds {len(states)} rank(s), this run has {world}"
        if problem is not None:
            warnings.warn(f"SimCLR augmentation generator not restored from the checkpoint ({problem}): "
                          f"augmentations restart from aug_seed and differ from an uninterrupted run",
                          stacklevel=2)
            return
        gen.set_state(states[rank].detach().to("cpu", torch.uint8))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """With ``aug_seed`` and ``accumulate_grad_batches > 1``: keep the training generator's state at every
        accumulation window's first micro-batch (before it draws), for a checkpoint set back to the window's start
        (:meth:`on_checkpoint_set_back`)."""
        super().on_train_batch_start(batch, batch_idx)
        if self.aug_seed is None or self._trainer is None:
            return
        acc = int(self.trainer.accumulate_grad_batches)
        if acc > 1 and batch_idx % acc == 0:      # Lightning's windows start at every multiple of acc in an epoch
            # Creating the generator here draws nothing: it is the one this micro-batch's views use.
            gen = self._generator_for("train", self.device)
            start = int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)
            self._window_aug_state = (start, gen.get_state())

    def on_checkpoint_set_back(self, checkpoint: dict[str, Any], window_start: int) -> None:
        """Called by :class:`ecgfm.train.loop.AccumulationWindowCheckpoint` for a checkpoint it set back to the
        start of the gradient-accumulation window that began at the fit's ``window_start``-th batch, just before
        Lightning calls :meth:`on_save_checkpoint` for it: that save stores the generator state kept at the window's
        first micro-batch (:meth:`on_train_batch_start`), so the resumed run's replay of the window draws the same
        views as the uninterrupted run."""
        self._set_back = (id(checkpoint), int(window_start))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the training augmentation generator state of every rank under :data:`AUG_STATE_KEY`.

        The current state, or for a checkpoint set back to an accumulation window's start
        (:meth:`on_checkpoint_set_back`) the state kept at that window's first micro-batch. Called on every rank
        (Lightning's ``dump_checkpoint``); under DDP the per-rank states are all-gathered, so each rank continues
        its own stream after a resume.
        """
        super().on_save_checkpoint(checkpoint)
        set_back, self._set_back = self._set_back, None
        if self.aug_seed is None:
            return
        # Creating the generator here (if no step ran yet) draws nothing: it is the one the next step would make.
        gen = self._generator_for("train", self.device)
        state = gen.get_state()                                         # (n,) uint8, on the CPU
        window = self._window_aug_state
        if set_back is not None and set_back[0] == id(checkpoint):
            if window is not None and window[0] == set_back[1]:
                state = window[1]                                       # as at the window's start
            else:   # this process resumed inside the window (from a checkpoint that was not set back)
                warnings.warn("checkpoint set back to a gradient-accumulation window's start that this process did "
                              "not train: it holds the SimCLR augmentation generator state from inside the window, "
                              "so a resume from it draws other views than an uninterrupted run", stacklevel=2)
        _, world = self._rank_world()
        if world > 1:
            gathered = self.all_gather(state.to(self.device))           # (world, n): same n on every rank
            states = [s.to("cpu", torch.uint8).clone() for s in gathered.reshape(world, -1)]
        else:
            states = [state.clone()]
        checkpoint[AUG_STATE_KEY] = {"aug_seed": int(self.aug_seed), "device_type": gen.device.type,
                                     "states": states}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the saved augmentation generator states; applied when the training generator is next made."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(AUG_STATE_KEY)
        if saved is None:
            if self.aug_seed is not None:
                warnings.warn("checkpoint holds no SimCLR augmentation generator state (written by an older "
                              "ecgfm?): augmentations restart from aug_seed", stacklevel=2)
            return
        if not (isinstance(saved, dict) and {"aug_seed", "device_type", "states"} <= set(saved)
                and all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in saved["states"])):
            raise ValueError(f"checkpoint entry {AUG_STATE_KEY!r} is malformed: expected aug_seed, device_type and "
                             f"a list of uint8 tensors")
        self._restored_aug_state = dict(saved)
        self._gens.pop("train", None)  # the next training draw starts from the restored state

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._gens.pop("val", None)  # same validation views every epoch

    def on_fit_start(self) -> None:
        """Refuse a datamodule whose sampling rate (its ``fs``) is not this module's ``fs``: the augmentations in
        seconds / Hz (time mask, baseline wander, powerline, low-pass) would run at the wrong rate without a word
        (the training pipeline checks ``method.fs`` in :func:`ecgfm.train.build.method_fs`; this covers the Python
        API). A datamodule without ``fs`` (or loaders passed to ``fit`` directly) is not checked.

        Raises:
            ValueError: both rates differ, naming them.
        """
        super().on_fit_start()
        self._window_aug_state = None     # kept by this fit's first window (on_train_batch_start)
        dm = getattr(self.trainer, "datamodule", None)
        data_fs = getattr(dm, "fs", None) if dm is not None else None
        if data_fs is None:
            return
        fs = float(self.hparams.fs)
        if not math.isclose(fs, float(data_fs), rel_tol=1e-6, abs_tol=1e-9):
            raise ValueError(f"SimCLRModule(fs={fs:g}) runs its augmentations in seconds / Hz (time mask, baseline "
                             f"wander, powerline, low-pass) at {fs:g} Hz, but the datamodule "
                             f"{type(dm).__name__} serves crops at {float(data_fs):g} Hz: build the module with "
                             f"fs={float(data_fs):g}")

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views ``(B, L, T)``: of ``batch["x"]`` twice, or of ``batch["x"]`` and
        ``batch["x2"]`` when the batch holds a second segment of each record (``PretrainDataModule(views=
        "segments")``: positives are then two moments of one recording; absent leads stay zero)."""
        x = batch["x"]
        x2 = batch.get("x2", x)
        lead_mask = batch.get("lead_mask")
        gen = self._generator(x.device)
        with torch.no_grad():
            return self.augment(x, lead_mask, gen), self.augment(x2, lead_mask, gen)

    def shared_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """NT-Xent of the projections of two augmented views.

        NT-Xent is weighted by ``contrastive_weight``. With ``aux_targets``, the loss adds ``aux_weight`` times the
        masked MSE of the pretext head's predictions from both views' embeddings against the batch's targets
        ``t (B, F)``.

        A pair one of whose crops or augmented views holds no signal (:func:`signal_views`: the all-zero ``x2`` of
        an adjacent pair of a record no longer than a crop, an all-zero crop, or a resized crop that fell wholly in
        a crop's zero padding) is left out of NT-Xent, of ``pos_sim`` / ``acc`` and,
        for its all-zero view, of the pretext regression; such a pair skips the projector and the encoder (a view with
        signal still passes the encoder when the pretext regression reads it), so it enters no BatchNorm's
        statistics (:func:`~ecgfm.methods.base.rows_only`). A batch with no pair left
        (on any DDP rank) gives NT-Xent 0, attached to the graph (CLOCS's loss without a valid view).

        Returns:
            ``(loss, {"pos_sim": mean cosine of positive pairs, "acc": top-1 positive retrieval in the local
            batch})`` over the pairs left in (0 without any); with ``aux_targets`` also ``"nt_xent"`` and
            ``"aux_mse"`` (the two parts of the loss).
        """
        if self.aux_head is not None and "t" not in batch:
            raise ValueError(f"aux_targets={self.aux_targets!r}: the batch holds no pretext targets 't' (build the "
                             "data module with record_targets, as the training pipeline does)")
        v1, v2 = self.views(batch)
        n = v1.shape[0]
        lead_mask = batch.get("lead_mask")
        # a view without signal (the all-zero x2 of an adjacent pair of a record no longer than a crop) is no view:
        # its pair is left out of NT-Xent, as CLOCS leaves such views out. Decided on the crops (an absolute noise
        # may fill an all-zero crop) and on the augmented views: the resized crop can land wholly in the padding of
        # a crop less than half recorded, and every noise of the presets scales with the signal, so that view is
        # all zero (identical for every such record: each other's perfect match)
        crop1 = signal_views(batch["x"], lead_mask)
        ok1 = crop1 & signal_views(v1, lead_mask)
        ok2 = (signal_views(batch["x2"], lead_mask) if "x2" in batch else crop1) & signal_views(v2, lead_mask)
        keep = ok1 & ok2
        if lead_mask is not None:
            lead_mask = view_lead_masks(torch.cat([v1, v2]), torch.cat([lead_mask, lead_mask]))
        # both views in one pass: (2B, D), (2B, proj); the pairs left out of NT-Xent skip the projector and the
        # encoder (the encoder still sees a view with signal when the pretext regression uses it), so that they
        # enter no BatchNorm's statistics (their rows are zeros)
        pairs_kept = torch.cat([keep, keep])
        h = rows_only(self.embed_batch, (torch.cat([v1, v2]), lead_mask),
                      pairs_kept if self.aux_head is None else torch.cat([ok1, ok2]))
        z = rows_only(self.projector, (h,), pairs_kept)
        z1, z2 = z[:n], z[n:]
        record = batch.get("index")
        if not bool(keep.all()):
            z1, z2 = z1[keep], z2[keep]
            record = None if record is None else record[keep]
        # every rank takes the same collectives: under DDP the pair counts of all ranks decide (a rank without a
        # pair still gathers with the others; with none on any rank, nt_xent has nothing to gather)
        world = world_info()[1]
        pairs = z1.shape[0] if world == 1 else sum(gather_counts(z1.shape[0], z1.device))
        if pairs == 0:
            nt = z.sum() * 0.0       # no pair left: 0, attached to the graph (as CLOCS's loss without a positive)
        else:
            nt = nt_xent(z1, z2, temperature=self.temperature, record=record)
        loss = self.contrastive_weight * nt
        with torch.no_grad():
            u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
            sim = u1 @ u2.T
            if sim.shape[0]:
                acc = (sim.argmax(1) == torch.arange(sim.shape[0], device=sim.device)).float().mean()
                terms = {"pos_sim": sim.diagonal().mean(), "acc": acc}
            else:                    # no pair: 0, as CLOCS's pos_sim without a valid view pair
                terms = {"pos_sim": sim.new_zeros(()), "acc": sim.new_zeros(())}
        if self.aux_head is not None:
            t = batch["t"]
            # each view predicts its own targets: t2 of x2 when the targets are crop-level, else its record's
            target = torch.cat([t, batch.get("t2", t)])
            # nor does a view without signal regress its targets
            target = torch.where(torch.cat([ok1, ok2])[:, None], target, torch.full_like(target, float("nan")))
            aux = masked_target_mse(self.aux_head(h), target)
            if self.training:   # DDP: the gradient and the value of the global mean over known entries
                known = torch.isfinite(target).sum()
                aux = ddp_mean(aux * known, known)
            terms.update(nt_xent=nt.detach(), aux_mse=aux.detach())
            loss = loss + self.aux_weight * aux
        return loss, terms
