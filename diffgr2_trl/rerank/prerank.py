"""Pre-rankers: the upstream models that give a re-ranker its 10 candidates.

Three models share one small interface (``fit(train_sequences)``, ``score(histories) -> [B, n_items + 1]`` with
column 0 the padding id), so :func:`recommend` and :func:`evaluate_full_ranking` work with any of them:

- :class:`PopularityPreRanker`: item frequency in the training split; the floor any sequential model must beat.
- :class:`TransitionPreRanker`: recency-weighted item-to-item transitions within a window (DESIGN.md section 2):
  counts ``T[a, b] += 1 / gap`` for every ``b`` that follows ``a`` within ``window`` steps of a training sequence,
  and scores a user by the transition rows of the last ``window`` history items weighted ``1 / recency``.
- :class:`SASRecPreRanker`: SASRec (Kang & McAuley, ICDM 2018), a causal self-attention sequential recommender,
  trained here with full-softmax cross-entropy over all items (much stronger than the original one-negative BCE
  for the same number of epochs; both are available through ``SASRecConfig.loss``).

Full-ranking evaluation follows S3-Rec's protocol: every item is scored, items already in the user's history are
excluded, and HR@10 / NDCG@10 are read from the top 10.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .metrics import ndcg_at_k, rank_of, recall_at_k

__all__ = [
    "PopularityPreRanker",
    "SASRec",
    "SASRecConfig",
    "SASRecPreRanker",
    "TransitionPreRanker",
    "evaluate_full_ranking",
    "recommend",
]


def _left_pad(histories: list[list[int]], max_len: int) -> torch.Tensor:
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for r, h in enumerate(histories):
        h = h[-max_len:]
        if h:
            out[r, max_len - len(h) :] = torch.tensor(h, dtype=torch.long)
    return out


class PopularityPreRanker:
    """Scores every item by its training frequency (same list for every user)."""

    name = "popularity"

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.counts = torch.zeros(n_items + 1)

    def fit(self, train: dict[int, list[int]]) -> PopularityPreRanker:
        for s in train.values():
            self.counts += torch.bincount(torch.tensor(s), minlength=self.n_items + 1).float()
        return self

    def score(self, histories: list[list[int]]) -> torch.Tensor:
        return self.counts.unsqueeze(0).expand(len(histories), -1).clone()


class TransitionPreRanker:
    """Recency-weighted transition / co-occurrence model (see the module docstring).

    Args:
        n_items: largest item id.
        window: how far ahead a transition counts when fitting, and how many last history items query it.
        backward_weight: weight of reversed transitions (``b`` before ``a``): co-purchase is roughly symmetric and
            the reverse direction fills in rows of rarely-followed items. 0 (default) is the pure forward model:
            0.5 did not raise valid HR@10 or NDCG@10 (``results/data_prerank.md``), so it stays off.
        popularity_weight: tiny popularity prior so users whose last items have no transitions still get a ranked
            list and ties break towards popular items.
    """

    name = "transition"
    supports_held_out = True

    def __init__(self, n_items: int, window: int = 3, backward_weight: float = 0.0, popularity_weight: float = 1e-4):
        self.n_items, self.window = n_items, window
        self.backward_weight, self.popularity_weight = backward_weight, popularity_weight
        self.T: torch.Tensor | None = None
        self._pop_unit = 0.0
        self.pop = torch.zeros(n_items + 1)

    def fit(self, train: dict[int, list[int]]) -> TransitionPreRanker:
        rows, cols, vals = [], [], []
        for s in train.values():
            a = np.asarray(s)
            for gap in range(1, self.window + 1):
                if len(a) <= gap:
                    break
                rows.append(a[:-gap])
                cols.append(a[gap:])
                vals.append(np.full(len(a) - gap, 1.0 / gap))
                if self.backward_weight:
                    rows.append(a[gap:])
                    cols.append(a[:-gap])
                    vals.append(np.full(len(a) - gap, self.backward_weight / gap))
            self.pop[torch.from_numpy(a)] += 1
        n = self.n_items + 1
        idx = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
        # coalesce() sums duplicate (a, b) pairs; CSR makes the row gathers in score() cheap.
        with warnings.catch_warnings():  # torch flags sparse CSR as beta; the ops used here are long stable
            warnings.simplefilter("ignore", UserWarning)
            T = torch.sparse_coo_tensor(idx, torch.from_numpy(np.concatenate(vals)).float(), (n, n))
            self.T = T.coalesce().to_sparse_csr()
        self._pop_unit = 1.0 / float(self.pop.max().clamp(min=1))  # what one purchase adds to the normalised prior
        self.pop = self.pop / self.pop.max().clamp(min=1)
        return self

    def score(
        self, histories: list[list[int]], held_out: list[tuple[list[int], int]] | None = None
    ) -> torch.Tensor:
        """Scores ``[B, n_items + 1]``; ``held_out`` removes each row's own future from the fitted counts.

        ``held_out[r] = (sequence, i)``: the fitted training sequence of row ``r``'s user and the position of its
        target (``histories[r] == sequence[:i]``). Every transition of that sequence that ends at ``i`` or later
        (and their popularity counts) is subtracted, so a training prefix is scored by exactly the model a valid/test
        history would see: all of the user's past, none of the transition being predicted (leave-one-out).
        """
        assert self.T is not None, "call fit() first"
        if held_out is not None and len(held_out) != len(histories):
            raise ValueError(f"held_out has {len(held_out)} rows for {len(histories)} histories.")
        rows, cols, vals = [], [], []
        for r, h in enumerate(histories):
            for back, item in enumerate(reversed(h[-self.window :])):
                rows.append(r)
                cols.append(item)
                vals.append(1.0 / (back + 1))
        # Sparse query (<= window non-zeros per row) @ sparse T: several times faster than a dense query.
        q = torch.sparse_coo_tensor(
            torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
            torch.tensor(vals, dtype=torch.float32),
            (len(histories), self.n_items + 1),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scores = (q.coalesce().to_sparse_csr() @ self.T).to_dense()
        scores = scores + self.popularity_weight * self.pop
        if held_out is not None:
            for r, (seq, i) in enumerate(held_out):
                self._subtract_future(scores[r], seq, i)
        return scores

    def _subtract_future(self, row: torch.Tensor, seq: list[int], i: int) -> None:
        """Remove ``seq``'s transitions ending at position ``>= i`` from one row of scores (see :meth:`score`)."""
        if not 0 < i < len(seq):
            raise ValueError(f"held-out position {i} is outside a sequence of length {len(seq)}.")
        query: dict[int, float] = {}
        for back, item in enumerate(reversed(seq[:i][-self.window :])):
            query[item] = query.get(item, 0.0) + 1.0 / (back + 1)
        for k in range(i, len(seq)):
            for gap in range(1, self.window + 1):
                j = k - gap
                if j < 0:
                    break
                w = query.get(seq[j], 0.0)
                if w:
                    row[seq[k]] -= w / gap
                if self.backward_weight:
                    w = query.get(seq[k], 0.0)
                    if w:
                        row[seq[j]] -= w * self.backward_weight / gap
            row[seq[k]] -= self.popularity_weight * self._pop_unit


# --------------------------------------------------------------------------------------------------- SASRec


@dataclass
class SASRecConfig:
    """SASRec hyper-parameters (defaults: CPU-sized; how they were chosen: results/data_prerank.md).

    Parameters:
        hidden: embedding / model width.
        n_blocks: transformer blocks.
        n_heads: attention heads.
        max_len: history length the model sees (older items are dropped).
        dropout: dropout on embeddings, attention and feed-forward.
        loss: ``"ce"`` (full softmax over all items) or ``"bce"`` (one sampled negative per position, the paper's).
        epochs: training epochs over all users' training prefixes.
        batch_size: users per step.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        seed: seeds init, shuffling, dropout and negative sampling.
    """

    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    max_len: int = 50
    dropout: float = 0.3
    loss: str = "ce"
    epochs: int = 3
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0


class SASRec(nn.Module):
    """Causal self-attention over item embeddings; the item table is tied to the output layer."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, cfg.n_heads, dim_feedforward=cfg.hidden, dropout=cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq``: [B, L] left-padded item ids -> hidden states [B, L, hidden]."""
        L = seq.shape[1]
        x = self.item_emb(seq) * math.sqrt(self.cfg.hidden) + self.pos_emb(torch.arange(L))
        x = self.drop(x) * (seq > 0).unsqueeze(-1)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        # No key-padding mask: padded positions sit left of every real one and are zeroed, and a fully padded
        # query row would otherwise attend to nothing (NaN). Causality alone keeps real positions clean enough.
        h = self.encoder(x, mask=causal, is_causal=True)
        return self.norm(h)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_emb.weight.t()


class SASRecPreRanker:
    """Trains :class:`SASRec` on the training split and scores users from their last hidden state."""

    name = "sasrec"

    def __init__(self, n_items: int, config: SASRecConfig | None = None, progress: bool = True):
        self.n_items = n_items
        self.cfg = config or SASRecConfig()
        self.progress = progress
        self.model: SASRec | None = None
        self.train_log: list[dict] = []

    def fit(self, train: dict[int, list[int]]) -> SASRecPreRanker:
        cfg = self.cfg
        seqs = [s for s in train.values() if len(s) >= 2]
        inputs = _left_pad([s[:-1] for s in seqs], cfg.max_len)
        targets = _left_pad([s[1:] for s in seqs], cfg.max_len)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.model = model = SASRec(self.n_items, cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            g = torch.Generator().manual_seed(cfg.seed)
            lengths = torch.tensor([min(len(s) - 1, cfg.max_len) for s in seqs], dtype=torch.float)
            steps = math.ceil(len(seqs) / cfg.batch_size)
            bar = tqdm(total=cfg.epochs * steps, desc="SASRec", disable=not self.progress, mininterval=2)
            for epoch in range(cfg.epochs):
                model.train()
                # Length-bucketed batches (random tie order, random batch order): most users of the Amazon datasets have < 10
                # items, so trimming padding per batch makes an epoch several times cheaper than random batches.
                jitter = torch.rand(len(seqs), generator=g)
                perm = torch.argsort(lengths + jitter)
                batches = list(perm.split(cfg.batch_size))
                order = torch.randperm(len(batches), generator=g).tolist()
                total, t0 = 0.0, time.perf_counter()
                for b in order:
                    idx = batches[b]
                    x, y = inputs[idx], targets[idx]
                    # Trim the all-padding left columns: most users are far shorter than max_len.
                    width = int((x > 0).sum(1).max())
                    x, y = x[:, -width:], y[:, -width:]
                    h = model(x)
                    valid = y > 0
                    hv, yv = h[valid], y[valid]
                    if cfg.loss == "ce":
                        logits = model.item_logits(hv)
                        logits[:, 0] = float("-inf")
                        loss = F.cross_entropy(logits, yv)
                    else:
                        neg = torch.randint(1, self.n_items + 1, yv.shape, generator=g)
                        pos_l = (hv * model.item_emb(yv)).sum(-1)
                        neg_l = (hv * model.item_emb(neg)).sum(-1)
                        loss = F.softplus(-pos_l).mean() + F.softplus(neg_l).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item()
                    bar.update(1)
                self.train_log.append(
                    {"epoch": epoch, "loss": total / steps, "seconds": round(time.perf_counter() - t0, 1)}
                )
                bar.set_postfix(loss=f"{total / steps:.3f}")
            bar.close()
        model.eval()
        return self

    @torch.no_grad()
    def score(self, histories: list[list[int]]) -> torch.Tensor:
        assert self.model is not None, "call fit() first"
        x = _left_pad(histories, self.cfg.max_len)
        width = max(int((x > 0).sum(1).max()), 1)
        h = self.model(x[:, -width:])[:, -1]
        return self.model.item_logits(h)

    def item_embeddings(self) -> np.ndarray:
        """[n_items + 1, hidden] learned item table (row 0 = padding); usable for semantic IDs."""
        assert self.model is not None
        return self.model.item_emb.weight.detach().numpy().copy()

    def config_dict(self) -> dict:
        return asdict(self.cfg)


# ------------------------------------------------------------------------------------------------ inference


@torch.no_grad()
def recommend(
    model,
    histories: list[list[int]],
    k: int = 10,
    exclude_history: bool = True,
    batch_size: int = 1024,
    held_out: list[tuple[list[int], int]] | None = None,
) -> np.ndarray:
    """Top-``k`` item ids per history, best first, as an int array [N, k].

    ``held_out`` (leave-one-out scoring of training prefixes) is passed to the model's ``score``; only pre-rankers
    that support it (:class:`TransitionPreRanker`) accept it.

    Items already in the history are excluded (S3-Rec's full-ranking protocol; re-buying is rare in Amazon 5-core
    and a re-ranker gains nothing from candidates the user already has). Ties break towards the lower item id so the
    output is deterministic.
    """
    if held_out is not None and not getattr(model, "supports_held_out", False):
        raise ValueError(
            f"Leave-one-out candidates need a pre-ranker that can drop a user's own future transitions "
            f"(transition); {getattr(model, 'name', type(model).__name__)!r} cannot."
        )
    out = np.zeros((len(histories), k), dtype=np.int64)
    for start in range(0, len(histories), batch_size):
        hs = histories[start : start + batch_size]
        if held_out is None:
            s = model.score(hs).float().clone()
        else:
            s = model.score(hs, held_out=held_out[start : start + batch_size]).float().clone()
        s[:, 0] = float("-inf")
        if exclude_history:
            rows = torch.tensor([r for r, h in enumerate(hs) for _ in h], dtype=torch.long)
            cols = torch.tensor([i for h in hs for i in h], dtype=torch.long)
            if len(rows):
                s[rows, cols] = float("-inf")
        # topk on k + margin, then a stable (score desc, id asc) sort fixes tie order inside the list.
        vals, idx = torch.topk(s, min(k + 16, s.shape[1]), dim=1)
        order = np.lexsort((idx.numpy(), -vals.numpy()), axis=1)[:, :k]
        out[start : start + len(hs)] = np.take_along_axis(idx.numpy(), order, axis=1)
    return out


def evaluate_full_ranking(
    model, histories: list[list[int]], targets: list[int], k: int = 10, batch_size: int = 1024
) -> dict[str, float]:
    """Full-ranking ``HR@k`` / ``NDCG@k`` (history items excluded) over all given users."""
    recs = recommend(model, histories, k=k, batch_size=batch_size)
    ranks = [rank_of(t, r) for t, r in zip(targets, recs.tolist())]
    n = max(len(ranks), 1)
    return {
        f"HR@{k}": sum(recall_at_k(r, k) for r in ranks) / n,
        f"NDCG@{k}": sum(ndcg_at_k(r, k) for r in ranks) / n,
        "users": len(ranks),
    }
