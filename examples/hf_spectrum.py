"""The Hessian spectrum of a small Hugging Face GPT-2 over a data set of token batches, before and after training.

A two-layer GPT-2 (random initialisation, ``transformers``) learns a synthetic
language: token sequences from a Markov chain in which every token has two likely
successors. The loss is the model's next-token cross-entropy over all batches,

    f = so.functional_loss(model, nn.CrossEntropyLoss(), output=lambda out: out.logits.transpose(1, 2))
    F = so.dataset_loss(f, [(inputs, targets), ...])     # inputs: {"input_ids": ...}

``so.eigenvalues(F, k=3)`` gives the top Hessian eigenvalues by Lanczos and
``so.spectral_density(F)`` the eigenvalue density by stochastic Lanczos
quadrature, each a pass over the data per step with the memory of one batch.
Nothing about the model is special-cased: it is called as ``model(**inputs)``,
its attention runs through PyTorch's math kernel while secorder differentiates
it (the fused kernels have no double backward), and its logits come from its
``ModelOutput``. The script trains for a few steps with AdamW, computes both
again, checks every returned eigenpair against Hessian-vector products, and
plots the two densities (``--out``).

Run: ``python examples/hf_spectrum.py [--steps 40] [--out hf_spectrum.png]``
(``--quick``: a one-layer model and a few steps, for the tests).
"""

import argparse

import torch
from torch import nn

import secorder as so

try:
    import transformers
except ImportError as exc:  # an optional dependency: pip install transformers
    raise SystemExit(f"this example needs the transformers package ({exc})") from None


def lm_logits(out):
    """The ``[N, T, vocab]`` logits of the model's output as cross-entropy takes them: ``[N, vocab, T]``."""
    return out.logits.transpose(1, 2)


def markov_tokens(num_sequences, length, vocab, generator):
    """Sequences from a Markov chain in which each token is followed by one of two tokens (80% / 20%)."""
    first = torch.randperm(vocab, generator=generator)
    second = torch.randperm(vocab, generator=generator)
    tokens = torch.empty(num_sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (num_sequences,), generator=generator)
    for t in range(1, length):
        pick = torch.rand(num_sequences, generator=generator) < 0.8
        prev = tokens[:, t - 1]
        tokens[:, t] = torch.where(pick, first[prev], second[prev])
    return tokens


def make_data(num_batches, batch_size, length, vocab, seed=0):
    """Batches of ``({"input_ids": [B, T]}, next-token targets [B, T])``, the last position ignored."""
    g = torch.Generator().manual_seed(seed)
    tokens = markov_tokens(num_batches * batch_size, length, vocab, g)
    targets = torch.cat([tokens[:, 1:], torch.full((len(tokens), 1), -100)], dim=1)
    return [({"input_ids": tokens[i:i + batch_size]}, targets[i:i + batch_size])
            for i in range(0, len(tokens), batch_size)]


def analyse(F, params, k, probes, iterations):
    """Top eigenvalues (with eigenvectors) and the spectral density of the data-set loss at ``params``."""
    values, vectors = so.eigenvalues(F, k=k, seed=0, return_eigenvectors=True)(params)
    density = so.spectral_density(F, num_probes=probes, num_iterations=iterations, seed=0)(params)
    return values, vectors, density


def worst_residual(F, params, values, vectors):
    """``max_i ||H u_i - lambda_i u_i|| / |lambda_1|`` over the returned eigenpairs, by Hessian-vector products."""
    worst = 0.0
    for i, lam in enumerate(values):
        u = {name: v[i] for name, v in vectors.items()}
        hu = so.hvp(F)(params, u)
        r = so.tree.ravel(hu)[0] - lam * so.tree.ravel(u)[0]
        worst = max(worst, float(r.norm() / values[0].abs()))
    return worst


def train(model, batches, steps, lr):
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        inputs, targets = batches[step % len(batches)]
        loss = loss_fn(lm_logits(model(**inputs)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 60, quick 10)")
    parser.add_argument("--out", default=None, help="where to save the plot of the two densities (png)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and budget (seconds)")
    args = parser.parse_args()

    quick = args.quick
    vocab, length = (16, 8) if quick else (32, 16)
    width, layers = (16, 1) if quick else (32, 2)
    num_batches, batch_size = (2, 4) if quick else (6, 8)
    steps = args.steps if args.steps is not None else (10 if quick else 60)
    k, probes, iterations = (2, 2, 12) if quick else (3, 4, 40)

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers, n_head=2,
                                     bos_token_id=0, eos_token_id=0, use_cache=False, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = make_data(num_batches, batch_size, length, vocab)
    f = so.functional_loss(model, nn.CrossEntropyLoss(), output=lm_logits)
    F = so.dataset_loss(f, batches)
    print(f"GPT-2 ({layers} layer(s), width {width}, vocabulary {vocab}): {so.tree.size(so.params_dict(model)):,} "
          f"parameters; {num_batches} batches of {batch_size} sequences of {length} tokens")

    rows = []
    for label in ("before training", f"after {steps} steps"):
        if rows:
            train(model, batches, steps, lr=3e-3)
        params = {name: p.clone() for name, p in so.params_dict(model).items()}
        with torch.no_grad():
            loss = float(F(params))
        values, vectors, density = analyse(F, params, k, probes, iterations)
        rows.append((label, loss, values, density, worst_residual(F, params, values, vectors)))

    print(f"{'':<18}{'loss':>8}   top Hessian eigenvalues")
    for label, loss, values, _, _ in rows:
        print(f"{label:<18}{loss:>8.4f}   " + ", ".join(f"{float(v):8.4f}" for v in values))
    worst = max(r[4] for r in rows)
    assert worst < 1e-2, f"an eigenpair's residual is {worst:.2e} of the top eigenvalue"
    print(f"every eigenpair checked by Hessian-vector products: ||H u - lambda u|| <= {worst:.1e} |lambda_1|")

    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (label, _, _, density, _) in rows:
            density.plot(ax, label=label)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title("Hessian spectrum of a small GPT-2 (SLQ)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"spectral densities saved to {args.out}")


if __name__ == "__main__":
    main()
