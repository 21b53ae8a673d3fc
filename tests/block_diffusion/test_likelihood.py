import pytest
import torch

from diffgr2_trl.block_diffusion import BlockDiffusionSampler, get_spec, left_pad
from diffgr2_trl.block_diffusion.likelihood import replay_logprobs
from tests.helpers import converted

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13]]


@pytest.mark.parametrize(
    "block_size,kw",
    [(4, dict(tau=0.3)), (4, dict(tau=0.5, temperature=1.0)), (8, dict(tokens_per_step=2, temperature=0.7, top_k=10))],
)
@pytest.mark.parametrize("streams", [None, 2])
def test_replay_equals_the_samplers_logprobs(word_tokenizer, block_size, kw, streams):
    model, tok = converted(word_tokenizer, block_size=block_size)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    out = BlockDiffusionSampler(model).generate(ids, am, max_completion_length=13, generator=torch.Generator().manual_seed(0), **kw)
    assert out.step_map.max() >= 2  # several steps per block, or the test would prove little
    lp = replay_logprobs(model, ids, am, out.canvas_ids, out.step_map, get_spec(model),
                         temperature=kw.get("temperature") or 1.0, max_streams_per_forward=streams).logps
    ok = out.completion_mask
    assert torch.allclose(lp[ok], out.logprobs[ok], atol=1e-5)


def test_replay_has_gradients(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=4)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    out = BlockDiffusionSampler(model).generate(ids, am, max_completion_length=8, tau=0.5)
    lp = replay_logprobs(model, ids, am, out.canvas_ids, out.step_map, get_spec(model)).logps
    lp[out.completion_mask].sum().backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_block_size_one_replay_is_ar_loglikelihood(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=1)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    out = BlockDiffusionSampler(model, eos_token_id=[]).generate(ids, am, max_completion_length=6, tau=0.9)
    lp = replay_logprobs(model, ids, am, out.canvas_ids, out.step_map, get_spec(model)).logps
    for r, p in enumerate(PROMPTS):
        seq = torch.tensor([p + out.canvas_ids[r].tolist()])
        logits = model(input_ids=seq).logits[0, len(p) - 1 : -1].float()
        logits[:, get_spec(model).mask_token_id] = float("-inf")
        ar = torch.log_softmax(logits, -1).gather(-1, seq[0, len(p):, None]).squeeze(-1)
        assert torch.allclose(lp[r], ar, atol=1e-5)


def _tiny_lm(model_type: str, **fields):
    """A one-layer ``model_type`` causal LM (vocabulary 40), seeded, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _logits_and_replayed(model):
    from diffgr2_trl.block_diffusion.likelihood import output_logits

    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 40, (2, 6)), output_hidden_states=True)
        raw = model.get_output_embeddings()(out.hidden_states[-1])
        return out.logits, output_logits(model, out.hidden_states[-1]), raw


def test_output_logits_apply_the_forwards_final_soft_capping():
    """The replay applies the output layer to gathered states itself; it must post-process them as the model's
    forward does (Gemma 2's final logit soft-capping), or replayed log-probs stop matching the sampler's."""
    logits, got, raw = _logits_and_replayed(_tiny_lm("gemma2", final_logit_softcapping=0.1))
    assert raw.abs().max() > 0.2 > 0.1 >= logits.abs().max()  # the cap bites
    torch.testing.assert_close(got, logits)


@pytest.mark.parametrize("model_type, extra", [("cohere", {"logit_scale": 0.0625}),
                                                ("granite", {"logits_scaling": 8.0}),
                                                ("qwen3", {})])
def test_output_logits_apply_the_forwards_logit_scaling(model_type, extra):
    """Cohere multiplies its logits by ``logit_scale`` and Granite divides them by ``logits_scaling`` in the forward;
    the replay's output layer must do the same, and the probe the trainers run must pass."""
    from diffgr2_trl.block_diffusion.likelihood import check_output_logits

    model = _tiny_lm(model_type, **extra)
    logits, got, raw = _logits_and_replayed(model)
    if extra:  # the scaling is really there, and large enough to matter
        assert not torch.allclose(raw, logits, atol=1e-2)
    torch.testing.assert_close(got, logits)
    check_output_logits(model)


def test_check_output_logits_refuses_unknown_post_processing():
    """A forward that changes the logits in a way the replay does not know must be refused, naming the model."""
    from diffgr2_trl.block_diffusion.likelihood import check_output_logits

    model = _tiny_lm("qwen3")
    check_output_logits(model)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM \(qwen3\) post-processes its logits"):
        check_output_logits(model)


def test_check_output_logits_accepts_a_forward_prepared_for_bf16():
    """After a bf16 trainer, accelerate leaves the model's forward wrapped in autocast, so its output layer runs in
    bf16; the probe used to take that rounding for unknown post-processing and refused the next trainer (a bf16 CFT
    then OPD on one model). A real scaling on top of the autocast forward is still refused."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from diffgr2_trl.block_diffusion.likelihood import check_output_logits

    model = _tiny_lm("qwen3")
    for p in model.parameters():  # wide logits: bf16 rounding of the output layer exceeds the float32 tolerance
        torch.nn.init.normal_(p, std=0.5)
    # accelerate's state is a process-wide singleton that refuses a second precision: start from a fresh one (an
    # earlier test in this worker may have made an fp32 Accelerator) and leave a fresh one behind
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        model = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        head = model.get_output_embeddings()(out.hidden_states[-1])
    assert out.logits.dtype == torch.float32 and not torch.allclose(head, out.logits, rtol=1e-3, atol=1e-2)
    check_output_logits(model)

    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out

    model.forward = scaled
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM \(qwen3\) post-processes its logits"):
        check_output_logits(model)


def test_replay_through_ddp_with_device_ids(word_tokenizer, tmp_path):
    """accelerate gives DDP device_ids on GPUs; DDP then indexes its moved inputs, so the redirected forward must not
    be an empty call (it raised IndexError). Gloo, one process, device_ids set as on a GPU."""
    import torch.distributed as dist

    model, tok = converted(word_tokenizer, block_size=4)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    out = BlockDiffusionSampler(model).generate(ids, am, max_completion_length=8, tau=0.5)
    want = replay_logprobs(model, ids, am, out.canvas_ids, out.step_map, get_spec(model)).logps
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.device_ids = [0]
        got = replay_logprobs(ddp, ids, am, out.canvas_ids, out.step_map, get_spec(model)).logps
    finally:
        dist.destroy_process_group()
    assert torch.allclose(got, want, atol=1e-6)
    assert "forward" not in vars(model)  # the redirect leaves no instance attribute behind


@pytest.mark.parametrize("kw", [dict(tau=0.5), dict(tau=0.5, temperature=1.0)])
def test_replay_equals_the_samplers_logprobs_when_rows_leave_the_forward(word_tokenizer, kw):
    """Rows that fill their block early leave the block's later forwards; the step map they leave behind still
    rebuilds the canvas of every step, so replay equals the sampler's log-probs (what GRPO and OPD rely on)."""
    from tests.block_diffusion.test_sampler import peaked

    model, tok = peaked(word_tokenizer, block_size=8)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    out = BlockDiffusionSampler(model, eos_token_id=[]).generate(
        ids, am, max_completion_length=16, generator=torch.Generator().manual_seed(0), **kw)
    assert out.computed_row_forwards < out.forward_passes * len(PROMPTS)  # some rows did leave
    lp = replay_logprobs(model, ids, am, out.canvas_ids, out.step_map, get_spec(model),
                         temperature=kw.get("temperature") or 1.0).logps
    ok = out.completion_mask
    assert torch.allclose(lp[ok], out.logprobs[ok], atol=1e-5)


@pytest.mark.parametrize("streams", [None, 1])
def test_recomputed_replay_equals_the_kept_one_with_gradients(word_tokenizer, streams):
    """The bounded-memory replay (forward chunks and the output layer rebuilt in backward, a few columns at a time)
    gives the same log-probs, entropies and parameter gradients as the replay that keeps its whole graph."""
    model, tok = converted(word_tokenizer, block_size=4)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    out = BlockDiffusionSampler(model).generate(ids, am, max_completion_length=11, tau=0.3, temperature=0.8,
                                                generator=torch.Generator().manual_seed(0))
    assert out.step_map.max() >= 2
    spec, ok = get_spec(model), out.completion_mask
    weights = torch.randn(out.canvas_ids.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for recompute in (False, True):
        model.zero_grad()
        # chunk_size 7 over 3 rows: 2 columns per chunk, a ragged last chunk
        est = replay_logprobs(model, ids, am, out.canvas_ids, out.step_map, spec, temperature=0.8,
                              compute_entropy=True, max_streams_per_forward=streams, recompute=recompute, chunk_size=7)
        (est.logps * weights)[ok].sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((est.logps.detach(), est.entropies, grads))
    (lp0, ent0, g0), (lp1, ent1, g1) = results
    torch.testing.assert_close(lp1[ok], lp0[ok], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent1[ok], ent0[ok], atol=1e-6, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:  # float32 sums over chunks in another order: equal to 1e-6 of the gradient's scale
        scale = g0[name].abs().max().clamp_min(1.0).item()
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6 * scale, rtol=0, msg=name)
    assert torch.allclose(lp1[ok], out.logprobs[ok], atol=1e-5)  # and still what the sampler saw
