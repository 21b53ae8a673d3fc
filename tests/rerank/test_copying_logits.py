"""Mid-training's loss scores tokens with the logits the model's forward produces (soft-capping included)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM

from diffgr2_trl.rerank.copying import _completion_loss


def test_midtraining_loss_applies_gemma2_final_logit_softcapping():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # logits of a few units, where a cap of 0.5 changes the loss
        model.get_output_embeddings().weight.mul_(50)
    ids = torch.randint(1, 64, (2, 9))
    attention = torch.ones_like(ids)
    targets = torch.full_like(ids, -100)
    targets[:, 3:-1] = ids[:, 4:]  # position i predicts token i + 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        want = F.cross_entropy(logits[targets != -100].float(), targets[targets != -100])
        raw = F.cross_entropy(model.get_output_embeddings()(
            model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)[targets != -100].float(),
            targets[targets != -100])
        got = _completion_loss(model, ids, attention, targets)
    assert (raw - want).abs() > 0.05, (raw, want)  # the cap matters at this scale: the test can tell the two apart
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
