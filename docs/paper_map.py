"""Generate docs/paper_map.md: for every equation, component and table of the paper, the file:line that implements it.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681 (+ IBQ, arXiv 2412.02692).
The map is read from the code's own tags: a comment `# paper-map: <item>` on the line above (or at the end of) the
line that implements <item>, where <item> is one of ITEMS below. The map is never edited by hand:

  python docs/paper_map.py            # rewrite docs/paper_map.md
  python docs/paper_map.py --check    # exit 1 if an item has no tag, a tag names no item, or the file is stale

tests/test_paper_map.py runs the check, so a moved line or a new item without a tag fails the suite.
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "paper_map.md")
FILES = ["quantizer.py", "tokenizer.py", "losses.py", "teachers.py", "far.py", "train_tokenizer.py", "train_far.py", "sample.py",
         "evaluate.py", "figures.py", "ablate.py"]
TAG = re.compile(r"#\s*paper-map:\s*(.+?)\s*$")
# (item, what the paper says it is); the order of the table in docs/paper_map.md
ITEMS = [
    ("Eq. (1)", "nearest-code lookup q = argmin_j ||z - c_j|| (the paper's form; fast.nearest_code in blocks)"),
    ("Eq. (1) straight-through", "z_q = z + sg(c_q - z): the value of the code, the gradient of z"),
    ("Eq. (2)", "VQGAN objective: L_rec + L_VQ (codebook + beta commitment) + lambda_P LPIPS + lambda_G GAN"),
    ("Eq. (3)", "shared encoder trunk z = E(x)"),
    ("Eq. (4)", "one adapter per sub-codebook, z_i = A_i(z)"),
    ("Eq. (5)", "one quantizer per sub-codebook, z_q^i = Q(z_i; C_i)"),
    ("Eq. (6)", "decode the channel-wise concatenation [z_q^1; ...; z_q^k]"),
    ("Eq. (7)", "disentanglement regularizer: squared cosine of the sub-codes of each patch"),
    ("Eq. (8)", "total objective L_VQGAN + lambda_dis L_dis + lambda_rep L_rep"),
    ("Adapter", "Sec. 3.2: the adapter A_i, a pre-LN transformer over the latent tokens"),
    ("Feature heads", "Sec. 3.2.2: feature-prediction head P_i on a sub-codebook's codes"),
    ("Representation loss", "Sec. 3.2.2: InfoNCE between head token 0 and the frozen teacher's CLS feature"),
    ("FAR input", "Sec. 3.3: k embedding tables concatenated and aggregated by one linear layer"),
    ("Factorized AR head", "Sec. 3.3: p(q_t^1..q_t^k | h_t) = prod_i p(q_t^i | h_t, q_t^<i)"),
    ("Tab. 4 heads", "Tab. 4: k independent linear classifiers / MLP classifiers on h_t"),
    ("CFG", "Sec. 3.3: classifier-free guidance l_u + s (l_c - l_u) on every sub-code's logits, label dropout"),
    ("IBQ", "arXiv 2412.02692: onehot = hard - sg(soft) + soft, z_q = onehot C"),
    ("Tab. 1", "the FQGAN-Dual / -Triple presets at downsample 16 and 8"),
    ("Tab. 2", "the FAR-Base / FAR-Large presets"),
    ("Tab. 3", "the tokenizer ablation (VQ / FQ / + dis / + rep rows) at CPU scale"),
    ("Tab. 4", "the FAR head ablation at CPU scale"),
    ("Fig. 3", "reconstruction from each sub-codebook alone"),
    ("Fig. 4", "2-D embedding of each sub-codebook's codes, coloured by class"),
]


def collect():
    """{item: [(file, line number of the implementing line)]}, and a list of unknown tags (file, line, text)."""
    known, found, unknown = {name for name, _ in ITEMS}, {name: [] for name, _ in ITEMS}, []
    for name in FILES:
        lines = open(os.path.join(ROOT, name)).read().splitlines()
        for i, line in enumerate(lines):
            m = TAG.search(line)
            if not m:
                continue
            # a tag alone on its line points at the next line that is not a comment; a trailing tag at its own line
            target = i
            if line.lstrip().startswith("#"):
                target = next((j for j in range(i + 1, len(lines)) if not lines[j].lstrip().startswith("#")), i)
            for item in (s.strip() for s in m[1].split(";")):           # several items: "Eq. (7); Eq. (8)"
                if item in known:
                    found[item].append((name, target + 1))
                else:
                    unknown.append((name, i + 1, item))
    return found, unknown


def render(found):
    rows = [f"| {name} | {what} | " + "<br>".join(f"[`{f}:{n}`](../{f}#L{n})" for f, n in found[name]) + " |"
            for name, what in ITEMS]
    return "\n".join([
        "# Paper map", "",
        "Where each equation, component and table of *Factorized Visual Tokenization and Generation* (arXiv "
        "2411.16681) and of IBQ (arXiv 2412.02692) is implemented. Generated from the `# paper-map:` tags in the "
        "code by `python docs/paper_map.py`; `tests/test_paper_map.py` fails when it is stale.", "",
        "| item | what | implemented at |", "|---|---|---|", *rows, ""])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the map is incomplete or stale")
    args = p.parse_args(argv)
    found, unknown = collect()
    problems = [f"no `# paper-map: {name}` tag in {', '.join(FILES)}" for name, hits in found.items() if not hits]
    problems += [f"{f}:{n}: the tag names no item of docs/paper_map.py: {item!r}" for f, n, item in unknown]
    text = render(found)
    if args.check:
        if not os.path.exists(OUT) or open(OUT).read() != text:
            problems.append(f"{OUT} is stale: run python docs/paper_map.py")
    elif not problems:
        with open(OUT + ".tmp", "w") as f:
            f.write(text)
        os.replace(OUT + ".tmp", OUT)
        print(f"wrote {OUT}: {len(ITEMS)} items, {sum(map(len, found.values()))} places")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
