"""The inference KV cache: preallocated attention state for a pool of sessions.

Every session owns one slot of the pool. A slot holds, per layer, the attention k and v of ``sink + window +
slack`` frames of N tokens each, plus the model input of each stored frame (latent, keys, σ — what a prompt
re-cache needs to recompute the window) and the K/V of the session's prompt for cross-attention.

Frame f goes to frame slot f while f < sink (kept forever), else to ``sink + (f - sink) mod (window +
slack)``: a ring, so memory is fixed for a stream of any length and nothing is ever concatenated. Committed
frames older than the newest committed frame minus ``window`` are evicted; speculative frames live in the
slack part of the ring until ``commit`` (they become ordinary frames) or ``discard`` (they vanish). k is
stored with its rotary phase at the frame's absolute index (angles reduced mod 2π, valid in a stream of any
length; see ``models/dit.py``), so a read rotates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from worldloop.models.config import ModelConfig


@dataclass
class PromptKV:
    """Cross-attention k/v of a batch of prompts for every layer, computed once per prompt.

    ``k``, ``v``: (depth, B, H, T+1, Dh) — token 0 is the learned null token; ``mask``: (B, T+1) bool.
    """

    k: Tensor
    v: Tensor
    mask: Tensor


@dataclass
class CacheView:
    """What attention reads for a batch of slots: k, v (depth, B, H, F·N, Dh), live buffer views of which the
    token ranges ``runs`` are read, in order; for those frame slots (B, F'): absolute frame index (-1 =
    empty), valid and sink flags; and the prompt K/V."""

    k: Tensor
    v: Tensor
    runs: tuple[slice, ...]
    frames: Tensor
    valid: Tensor
    sink: Tensor
    prompt: PromptKV
    previous: Tensor

    def layer(self, i: int) -> tuple[list[Tensor], list[Tensor]]:
        """Layer i's cached k and v as lists of (B, H, L, Dh) pieces, to concatenate with new ones."""
        return [self.k[i][:, :, r] for r in self.runs], [self.v[i][:, :, r] for r in self.runs]


@dataclass
class ContextFrames:
    """Stored model inputs of a slot's frames, oldest first: frames (G,), latents (G, C, h, w), keys (G, K),
    σ (G,)."""

    frames: Tensor
    latents: Tensor
    keys: Tensor
    sigma: Tensor


@dataclass
class CacheSnapshot:
    """A copy of one slot (every buffer's slice), restorable into any slot of a cache with the same shapes."""

    tensors: dict[str, Tensor]


class KVCache:
    _SLOT_BUFFERS = ("latents", "keys", "sigma", "frames", "speculative", "prompt_mask")
    _LAYER_BUFFERS = ("k", "v", "prompt_k", "prompt_v")

    def __init__(self, *, depth: int, heads: int, head_dim: int, tokens: int, sink: int, window: int,
                 slack: int, max_sessions: int, latent_shape: tuple[int, int, int], num_keys: int,
                 prompt_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if window < 1 or sink < 0 or slack < 0 or max_sessions < 1:
            raise ValueError("window and max_sessions must be >= 1; sink and slack >= 0")
        self.depth, self.heads, self.head_dim, self.tokens = depth, heads, head_dim, tokens
        self.sink, self.window, self.slack, self.max_sessions = sink, window, slack, max_sessions
        self.ring = window + slack
        self.num_frames = sink + self.ring  # frame slots per session
        self.device, self.dtype = torch.device(device), dtype
        # (layers, sessions, H, F·N, Dh): frame slot f holds tokens f·N … (f+1)·N - 1.
        kv = (depth, max_sessions, heads, self.num_frames * tokens, head_dim)
        self.k = torch.zeros(kv, device=self.device, dtype=dtype)
        self.v = torch.zeros(kv, device=self.device, dtype=dtype)
        self.latents = torch.zeros(max_sessions, self.num_frames, *latent_shape, device=self.device)
        self.keys = torch.zeros(max_sessions, self.num_frames, num_keys, device=self.device)
        self.sigma = torch.zeros(max_sessions, self.num_frames, device=self.device)
        self.frames = torch.full((max_sessions, self.num_frames), -1, dtype=torch.long, device=self.device)
        self.speculative = torch.zeros(max_sessions, self.num_frames, dtype=torch.bool, device=self.device)
        pk = (depth, max_sessions, heads, prompt_tokens, head_dim)
        self.prompt_k = torch.zeros(pk, device=self.device, dtype=dtype)
        self.prompt_v = torch.zeros(pk, device=self.device, dtype=dtype)
        self.prompt_mask = torch.zeros(max_sessions, prompt_tokens, dtype=torch.bool, device=self.device)
        self.prompt_mask[:, 0] = True  # the null token: attention over the prompt is always defined
        self._is_sink_slot = torch.arange(self.num_frames, device=self.device) < sink

    @classmethod
    def for_model(cls, config: ModelConfig, max_sessions: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> KVCache:
        d = config.dit
        return cls(depth=d.depth, heads=d.heads, head_dim=d.head_dim, tokens=config.tokens_per_frame,
                   sink=d.sink, window=d.window, slack=d.slack, max_sessions=max_sessions,
                   latent_shape=(config.latent_channels, *config.latent_size), num_keys=d.num_keys,
                   prompt_tokens=d.max_prompt_tokens + 1, device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        buffers = [getattr(self, n) for n in self._SLOT_BUFFERS + self._LAYER_BUFFERS]
        return sum(t.numel() * t.element_size() for t in buffers)

    def frame_slot(self, frames: Tensor) -> Tensor:
        """Absolute frame indices → frame slots (sink slots first, then the ring)."""
        return torch.where(frames < self.sink, frames, self.sink + (frames - self.sink) % self.ring)

    # -- writing -------------------------------------------------------------------------------------------

    def append(self, slots: Sequence[int], frames: Tensor, k: Tensor, v: Tensor, latents: Tensor,
               keys: Tensor, sigma: Tensor, present: Tensor | None = None,
               speculative: bool | Tensor = False) -> None:
        """Write finished frames: ``frames`` (B, G) absolute indices for the B ``slots``, k/v (depth, B, H,
        G·N, Dh), latents (B, G, C, h, w), keys (B, G, K), σ (B, G). Frames where ``present`` is False are
        skipped; ``speculative`` is one flag or one per row (B,).

        Committed frames that fall out of the window are evicted (a frame that would be evicted at once is not
        written); speculative frames stay until ``commit``/``discard``. At most ``slack`` speculative frames
        fit.
        """
        b, g = frames.shape
        frames = frames.to(self.device)
        present = torch.ones_like(frames, dtype=torch.bool) if present is None else present.to(self.device)
        newest = torch.where(present, frames, -1).max(dim=1, keepdim=True).values
        keep = present & ((frames < self.sink) | (frames > newest - self.window))
        rows, cols = keep.nonzero(as_tuple=True)
        slot_idx = torch.as_tensor(list(slots), device=self.device)[rows]
        f = frames[rows, cols]
        fs = self.frame_slot(f)
        n = self.tokens
        with torch.no_grad():  # the cache stops gradients
            for buf, new in ((self.k, k), (self.v, v)):
                src = new.unflatten(3, (g, n))[:, rows, :, cols]  # (P, depth, H, N, Dh)
                frames_view = buf.view(self.depth, self.max_sessions, self.heads, self.num_frames, n, -1)
                frames_view[:, slot_idx, :, fs] = src.to(self.dtype)
            self.latents[slot_idx, fs] = latents.to(self.device, torch.float32)[rows, cols]
            self.keys[slot_idx, fs] = keys.to(self.device, torch.float32)[rows, cols]
            self.sigma[slot_idx, fs] = sigma.to(self.device, torch.float32)[rows, cols]
        self.frames[slot_idx, fs] = f
        spec = torch.as_tensor(speculative, dtype=torch.bool, device=self.device).expand(b)
        self.speculative[slot_idx, fs] = spec[rows]
        self._evict_outside_window(sorted(set(slots)))

    def _evict_outside_window(self, slots: Sequence[int]) -> None:
        idx = torch.as_tensor(list(slots), device=self.device)
        frames, spec = self.frames[idx], self.speculative[idx]
        committed = (frames >= 0) & ~spec
        newest = torch.where(committed, frames, -1).max(dim=1, keepdim=True).values
        old = committed & ~self._is_sink_slot & (frames <= newest - self.window)
        self.frames[idx] = torch.where(old, -1, frames)

    def evict(self, slot: int, before: int | None = None) -> None:
        """Drop a slot's non-sink frames with index < ``before`` (all non-sink frames when None)."""
        frames = self.frames[slot]
        old = ~self._is_sink_slot & (frames >= 0)
        if before is not None:
            old &= frames < before
        self.frames[slot] = torch.where(old, -1, frames)
        self.speculative[slot] &= ~old

    def set_prompt(self, slots: Sequence[int], prompt: PromptKV) -> None:
        """Store the prompt K/V (depth, B, H, T+1, Dh) of each slot."""
        idx = torch.as_tensor(list(slots), device=self.device)
        with torch.no_grad():
            self.prompt_k[:, idx] = prompt.k.to(self.device, self.dtype)
            self.prompt_v[:, idx] = prompt.v.to(self.device, self.dtype)
        self.prompt_mask[idx] = prompt.mask.to(self.device)

    def reset(self, slot: int) -> None:
        """Empty a slot: no frames, null prompt only, zeroed buffers."""
        for name in self._LAYER_BUFFERS:
            getattr(self, name)[:, slot].zero_()
        for name in ("latents", "keys", "sigma", "speculative", "prompt_mask"):
            getattr(self, name)[slot].zero_()
        self.frames[slot] = -1
        self.prompt_mask[slot, 0] = True

    # -- speculative frames --------------------------------------------------------------------------------

    def commit(self, slot: int) -> None:
        """Speculative frames become ordinary frames; frames that left the window are evicted."""
        self.speculative[slot] = False
        self._evict_outside_window([slot])

    def discard(self, slot: int) -> None:
        """Drop the slot's speculative frames."""
        self.frames[slot] = torch.where(self.speculative[slot], -1, self.frames[slot])
        self.speculative[slot] = False

    # -- reading -------------------------------------------------------------------------------------------

    def view(self, slots: Sequence[int], compact: bool = True) -> CacheView:
        """The attention state of a batch of slots: a zero-copy slice when the slots are consecutive.

        On the CPU (and ``compact``), frame slots empty in every row are left out: ``runs`` lists the used
        stretches of the buffer, read by the same concatenation that appends the new frames, so skipping costs
        no copy. (The check reads the bookkeeping on the host; on CUDA that would cost a device sync, and the
        mask handles empty slots there — as it does for graphs of fixed shape, which take ``compact=False``.)
        """
        slots = list(slots)
        if slots == list(range(slots[0], slots[0] + len(slots))):
            sel: slice | Tensor = slice(slots[0], slots[0] + len(slots))
        else:
            sel = torch.as_tensor(slots, device=self.device)
        frames = self.frames[sel].clone()  # bookkeeping as of now; k/v are live views of the buffers
        newest = frames.argmax(dim=1)
        rows = torch.arange(len(frames), device=self.device)
        previous = self.latents[sel][rows, newest] * (frames.max(dim=1).values >= 0).view(-1, 1, 1, 1)
        k, v = self.k[:, sel], self.v[:, sel]
        prompt = PromptKV(self.prompt_k[:, sel], self.prompt_v[:, sel], self.prompt_mask[sel])
        sink = self._is_sink_slot.expand_as(frames)
        runs: tuple[slice, ...] = (slice(None),)
        if compact and self.device.type == "cpu":
            used = (frames >= 0).any(dim=0).tolist()
            if not all(used):
                cols = [i for i, u in enumerate(used) if u]
                starts = [c for c in cols if c - 1 not in cols]
                ends = [c + 1 for c in cols if c + 1 not in cols]
                n = self.tokens
                runs = tuple(slice(a * n, b * n) for a, b in zip(starts, ends, strict=True))
                frames, sink = frames[:, cols], sink[:, cols]
        valid = frames >= 0
        return CacheView(k, v, runs, frames, valid, valid & sink, prompt, previous)

    def stored_frames(self, slot: int, speculative: bool | None = None) -> list[int]:
        """A slot's stored frame indices, oldest first (only speculative / only committed ones if given)."""
        frames, spec = self.frames[slot].tolist(), self.speculative[slot].tolist()
        return sorted(f for f, s in zip(frames, spec, strict=True) if f >= 0 and speculative in (None, s))

    def context(self, slot: int, include_sink: bool = False) -> ContextFrames:
        """The stored model inputs of a slot's committed frames (non-sink only unless asked), oldest first."""
        frames = [f for f in self.stored_frames(slot, speculative=False) if include_sink or f >= self.sink]
        fs = self.frame_slot(torch.as_tensor(frames, dtype=torch.long, device=self.device))
        return ContextFrames(fs.new_tensor(frames), self.latents[slot, fs].clone(),
                             self.keys[slot, fs].clone(), self.sigma[slot, fs].clone())

    # -- snapshots -----------------------------------------------------------------------------------------

    def snapshot(self, slot: int) -> CacheSnapshot:
        tensors = {n: getattr(self, n)[:, slot].clone() for n in self._LAYER_BUFFERS}
        tensors |= {n: getattr(self, n)[slot].clone() for n in self._SLOT_BUFFERS}
        return CacheSnapshot(tensors)

    def restore(self, slot: int, snapshot: CacheSnapshot) -> None:
        with torch.no_grad():
            for name, value in snapshot.tensors.items():
                target = getattr(self, name)
                (target[:, slot] if name in self._LAYER_BUFFERS else target[slot]).copy_(value)
