"""CODI's computation (SPEC-CODI §2-4, §6): the projection, the training forward with its three
loss terms, and greedy answers after the continuous thoughts.

The student runs its question + bot (the encoder pass), then `K` thought passes, each one
position whose input is the projection of the previous pass's final hidden state (the first
takes the state at bot; the last pass's projection is never computed), then its decoder (eot,
the answer) against the keys/values of all of them. The teacher is one pass over question,
chain and answer: its token loss, and (detached) the distillation targets, the hidden state of
every layer at the distilled token.

`mask_pads=False` is the reference's behaviour, what its checkpoints were trained with: the
thought and decoder passes attend to the encoder's left pads and positions count them
(Llama's rotary positions make the offset vanish, GPT-2's learned ones do not). `mask_pads`
masks the pads and starts each row's positions at its question.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from coconut_jax.models import weight_product
from coconut_jax.models.common import EMBED, MLP

_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Projection:
    """Linear(D, H) -> GELU (erf) -> Linear(H, D) -> LayerNorm(D) (without it when `norm` is
    False), its params in f32 whatever the model's; a method part built fresh."""
    width: int
    hidden: int
    norm: bool = True

    def _shapes(self):
        d, h = self.width, self.hidden
        out = {"fc1": {"kernel": ((d, h), (EMBED, MLP)), "bias": ((h,), (MLP,))},
               "fc2": {"kernel": ((h, d), (MLP, EMBED)), "bias": ((d,), (EMBED,))}}
        if self.norm:
            out["ln"] = {"scale": ((d,), (EMBED,)), "bias": ((d,), (EMBED,))}
        return out

    def param_shapes(self, dtype=jnp.float32) -> dict:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], jnp.float32), self._shapes(),
                            is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], tuple))

    def logical_axes(self) -> dict:
        return jax.tree.map(lambda s: s[1], self._shapes(),
                            is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], tuple))

    def init(self, seed: int) -> dict:
        """PyTorch's Linear init (kernel and bias uniform in +-1/sqrt(fan_in)); LayerNorm 1, 0."""
        rng = np.random.default_rng([seed, 0xC0D1])

        def linear(n_in, n_out):
            bound = 1.0 / np.sqrt(n_in)
            return {"kernel": rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32),
                    "bias": rng.uniform(-bound, bound, (n_out,)).astype(np.float32)}
        out = {"fc1": linear(self.width, self.hidden), "fc2": linear(self.hidden, self.width)}
        if self.norm:
            out["ln"] = {"scale": np.ones(self.width, np.float32), "bias": np.zeros(self.width, np.float32)}
        return out

    def __call__(self, p, x):
        """x [..., D] in the model's compute dtype -> the next thought, in the same dtype (the
        matmuls in that dtype, as under the reference's autocast; the norm's statistics in f32)."""
        dt = x.dtype
        h = x @ p["fc1"]["kernel"].astype(dt) + p["fc1"]["bias"].astype(dt)
        h = jax.nn.gelu(h, approximate=False)
        y = h @ p["fc2"]["kernel"].astype(dt) + p["fc2"]["bias"].astype(dt)
        if not self.norm:
            return y
        yf = y.astype(jnp.float32)
        mean = yf.mean(-1, keepdims=True)
        var = ((yf - mean) ** 2).mean(-1, keepdims=True)
        return ((yf - mean) * jax.lax.rsqrt(var + _LN_EPS) * p["ln"]["scale"] + p["ln"]["bias"]).astype(dt)


def _segment(kv, mask):
    return {"k": kv["k"], "v": kv["v"], "mask": mask}


def _write(cache, kv, slot):
    return jax.tree.map(lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, slot, axis=3), cache, kv)


class Encoded(NamedTuple):
    """What the student's question and thoughts leave: the keys/values a decoder attends to,
    each row's next position [B], the final hidden states the thoughts were projected from
    [K,B,E], the thoughts fed [K,B,E], and the last thought pass's final state [B,E]."""
    past: list
    start: jax.Array
    sources: jax.Array
    fed: jax.Array
    last: jax.Array


def encode(model, params, prj, prj_params, enc_ids, enc_mask, n_latent: int, mask_pads: bool, keys=None) -> Encoded:
    """The student's question + bot and its `n_latent` thought passes (`Encoded`). `keys`:
    dropout keys (encoder, thoughts) or None."""
    b, we = enc_ids.shape
    k_enc, k_mid = (None, None) if keys is None else keys
    if mask_pads:
        positions = jnp.maximum(jnp.cumsum(enc_mask, axis=1) - 1, 0).astype(jnp.int32)
        start = jnp.sum(enc_mask, axis=1).astype(jnp.int32)
        past_mask = enc_mask
    else:  # the reference: positions count the left pads, later passes attend to them
        positions = jnp.broadcast_to(jnp.arange(we, dtype=jnp.int32), (b, we))
        start = jnp.full((b,), we, jnp.int32)
        past_mask = jnp.ones_like(enc_mask)
    h_enc, kv_enc = model.body(params, model.embed(params, enc_ids), positions, enc_mask, dropout_key=k_enc)
    past = [_segment(kv_enc, past_mask)]
    kv_mid = jax.tree.map(lambda a: jnp.zeros(a.shape[:3] + (n_latent,) + a.shape[4:], a.dtype), kv_enc)

    def thought_pass(params, c, carry, k):
        kv_mid, h_prev = carry
        z = prj(c["prj"], h_prev)[:, None]
        filled = jnp.broadcast_to(jnp.arange(n_latent) < k, (b, n_latent))
        key = None if c["key"] is None else jax.random.fold_in(c["key"], k)
        h, kv = model.body(params, z, (c["start"] + k)[:, None], jnp.ones((b, 1), bool),
                           c["past"] + [_segment(kv_mid, filled)], key)
        return (_write(kv_mid, kv, k), h[:, 0]), (h_prev, z[:, 0])
    consts = dict(prj=prj_params, start=start, past=past, key=k_mid)
    (kv_mid, h_last), (sources, fed) = weight_product.scan(thought_pass, params, consts, (kv_mid, h_enc[:, -1]),
                                                           jnp.arange(n_latent), n_layer=model.config.n_layer)
    return Encoded(past + [_segment(kv_mid, jnp.ones((b, n_latent), bool))], start + n_latent, sources, fed, h_last)


def _smooth_l1(x):
    a = jnp.abs(x)
    return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def distillation(student, teacher, rows):
    """SPEC-CODI §4: per layer, SmoothL1 (beta 1) between the student's and the (detached)
    teacher's states [L+1, B, E], meaned over the real rows' values, divided by the unbiased std
    of that layer's teacher values; then the mean over layers. (0, 0) for a batch of no rows."""
    s, t = student.astype(jnp.float32), jax.lax.stop_gradient(teacher.astype(jnp.float32))
    r = rows[None, :, None]
    n = jnp.sum(rows) * s.shape[-1]
    per_layer = jnp.sum(_smooth_l1(s - t) * r, axis=(1, 2)) / jnp.maximum(n, 1.0)
    mean = jnp.sum(t * r, axis=(1, 2), keepdims=True) / jnp.maximum(n, 1.0)
    std = jnp.sqrt(jnp.sum(((t - mean) * r) ** 2, axis=(1, 2)) / jnp.maximum(n - 1.0, 1.0))
    value = jnp.mean(per_layer / std)
    any_row = jnp.sum(rows) > 0
    return jnp.where(any_row, value, 0.0), any_row.astype(jnp.float32)


def teacher_pass(model, params, arrays, *, dropout_key=None, loss_chunk: int = 0):
    """The teacher's one pass (question, chain, answer; no mask, positions from 0): ((summed
    token loss, tokens), every layer's state at the distilled token [L+1, B, E])."""
    from coconut_jax.coconut import hidden_nll
    ref = arrays["ref_ids"]
    b, wt = ref.shape
    h, _, taps = model.body(params, model.embed(params, ref), jnp.broadcast_to(jnp.arange(wt), (b, wt)),
                            jnp.ones((b, wt), bool), dropout_key=dropout_key, taps=arrays["ref_pos"])
    return hidden_nll(model, params, h, arrays["ref_labels"], loss_chunk), taps


def student_pass(model, params, prj, prj_params, arrays, *, n_latent: int, mask_pads: bool, dropout_key=None,
                 loss_chunk: int = 0):
    """The student's question + bot, its thoughts and its decoder (eot, the answer): ((summed
    token loss, tokens), every layer's state at the distilled token [L+1, B, E], `Encoded`)."""
    from coconut_jax.coconut import hidden_nll
    keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
    enc = encode(model, params, prj, prj_params, arrays["enc_ids"], arrays["enc_mask"], n_latent, mask_pads,
                 None if dropout_key is None else keys[:2])
    dec = arrays["dec_ids"]
    b, wd = dec.shape
    h, _, taps = model.body(params, model.embed(params, dec), enc.start[:, None] + jnp.arange(wd)[None],
                            jnp.ones((b, wd), bool), enc.past, keys[2], taps=arrays["dec_pos"])
    return hidden_nll(model, params, h, arrays["dec_labels"], loss_chunk), taps, enc


def loss_terms(model, params, prj, prj_params, arrays, *, n_latent: int, mask_pads: bool, dropout_key=None,
               loss_chunk: int = 0, steps=None) -> dict:
    """{"student", "teacher": (summed token loss, tokens), "distill": (the batch's value, 1)}.
    One teacher pass serves its loss and (detached) the distillation targets.

    `steps`: (decoder, its params, `StepDecoding`) of a step decoder, which adds "steps": each
    step of the teacher's chain written out from one thought, z1..z_{K+1} (the last projected
    from the last thought pass, never fed to the student)."""
    from coconut_jax.methods import step_decoder
    params = model.stack_layers(params)
    k_teacher, k_student = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    teacher, taps_t = teacher_pass(model, params, arrays, dropout_key=k_teacher, loss_chunk=loss_chunk)
    student, taps_s, enc = student_pass(model, params, prj, prj_params, arrays, n_latent=n_latent,
                                        mask_pads=mask_pads, dropout_key=k_student, loss_chunk=loss_chunk)
    out = {"student": student, "teacher": teacher, "distill": distillation(taps_s, taps_t, arrays["rows"])}
    if steps is not None:
        decoder, decoder_params, how = steps
        thoughts = jnp.concatenate([enc.fed, prj(prj_params, enc.last)[None]])[:arrays["step_ids"].shape[1]]
        out["steps"] = step_decoder.decoder_loss(model, params, decoder, decoder_params,
                                                 jnp.swapaxes(thoughts, 0, 1)[:, :, None], arrays["step_ids"],
                                                 arrays["step_mask"], how,
                                                 None if dropout_key is None else jax.random.fold_in(dropout_key, 3),
                                                 loss_chunk)
    return out


@functools.partial(jax.jit, static_argnames=("model", "prj", "n_latent", "max_new_tokens", "mask_pads"))
def generate(model, params, prj, prj_params, enc_ids, enc_mask, eot, eos, *, n_latent: int, max_new_tokens: int,
             mask_pads: bool):
    """SPEC-CODI §6: question + bot, the thoughts, eot, then greedy decoding with the cache;
    logits cut before eot (pad and bot stay possible, as in the reference). A row stops at its
    first eos, which it keeps. Returns (tokens [B, max_new_tokens], number kept per row)."""
    model = model if model.scan_layers else model.replace(scan_layers=True)
    params = model.stack_layers(params)
    b = enc_ids.shape[0]
    past, start = encode(model, params, prj, prj_params, enc_ids, enc_mask, n_latent, mask_pads)[:2]
    cache = {n: jnp.concatenate([seg[n] for seg in past], axis=3) for n in ("k", "v")}
    width = cache["k"].shape[3]
    cache = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, max_new_tokens), (0, 0))), cache)
    key_mask = jnp.pad(jnp.concatenate([seg["mask"].astype(bool) for seg in past], axis=1),
                       ((0, 0), (0, max_new_tokens)))

    def step(prev, i, cache, key_mask):
        h, kv = model.body(params, model.embed(params, prev[:, None]), (start + i)[:, None], jnp.ones((b, 1), bool),
                           [_segment(cache, key_mask)])
        cache = _write(cache, kv, width + i)
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((b, 1), bool), (0, width + i))
        logits = model.logits(params, h[:, 0])
        logits = jnp.where(jnp.arange(logits.shape[-1]) < eot, logits, -jnp.inf)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache, key_mask

    first, cache, key_mask = step(jnp.full((b,), eot, jnp.int32), 0, cache, key_mask)
    tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = first == eos
    state = (jnp.int32(1), first, cache, key_mask, tokens, done, jnp.ones(b, jnp.int32))

    def cond(s):
        return (s[0] < max_new_tokens) & ~jnp.all(s[5])

    def body(s):
        i, prev, cache, key_mask, tokens, done, kept = s
        nxt, cache, key_mask = step(prev, i, cache, key_mask)
        tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(done, eos, nxt)[:, None], (0, i))
        kept = kept + (~done).astype(jnp.int32)
        return i + 1, nxt, cache, key_mask, tokens, done | (nxt == eos), kept

    _, _, _, _, tokens, _, kept = jax.lax.while_loop(cond, body, state)
    return tokens, kept


@functools.partial(jax.jit, static_argnames=("model", "prj", "n_latent"))
def thought_states(model, params, prj, prj_params, enc_ids, enc_mask, *, n_latent: int):
    """[B, K, E]: the final hidden state each thought is projected from (at bot, then at each
    thought but the last)."""
    enc = encode(model, model.stack_layers(params), prj, prj_params, enc_ids, enc_mask, n_latent, False)
    return jnp.swapaxes(enc.sources, 0, 1)


@functools.partial(jax.jit, static_argnames=("model", "prj", "n_latent"))
def thoughts_fed(model, params, prj, prj_params, enc_ids, enc_mask, *, n_latent: int):
    """[B, K+1, E]: the projected thoughts z1..z_{K+1} (the student reads the first K; a step
    decoder reads all)."""
    enc = encode(model, model.stack_layers(params), prj, prj_params, enc_ids, enc_mask, n_latent, False)
    return jnp.swapaxes(jnp.concatenate([enc.fed, prj(prj_params, enc.last)[None]]), 0, 1)
