"""Example: the Python client (service/client.py) against a running server.

    mae-serve &                                    # or docker compose up
    python examples/client.py --url http://localhost:8000 [--api-key KEY] [--out reconstruction.png]

Embeds the bundled sample images, prints each one's nearest neighbour by cosine similarity and its
top label, the server's nearest gallery items for the first one (when it has a gallery), and writes
one reconstruction (seeded, so the same picture every run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.client import Client

SAMPLES = Path(__file__).resolve().parents[1] / "service" / "samples"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://localhost:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", type=Path, default=Path("reconstruction.png"))
    args = p.parse_args()
    paths = sorted(SAMPLES.glob("*.png"))
    with Client(args.url, api_key=args.api_key) as mae:
        info = mae.info()
        print(f"model {info['model']['name']}: {info['limits']['max_images_per_request']} images per request")
        vectors = mae.embed(paths)  # [N, D], L2-normalized: the dot product is the cosine similarity
        similarity = vectors @ vectors.T
        similarity[range(len(paths)), range(len(paths))] = -1.0
        labels = mae.classify(paths, top_k=1) if info["routes"]["classify"] else [[None]] * len(paths)
        for i, path in enumerate(paths):
            nearest = paths[int(similarity[i].argmax())].stem
            top = labels[i][0]
            label = f"{top.label} ({top.score:.2f})" if top else "-"
            print(f"{path.stem:12s} nearest {nearest:12s} cosine {similarity[i].max():.3f}  label {label}")
        if info["routes"]["search"]:
            found = mae.search(paths[0], k=3)[0]  # the first (only) image's top 3 gallery items
            print(f"gallery items nearest {paths[0].stem}: "
                  + ", ".join(f"#{n.id} {n.label or '-'} ({n.score:.3f})" for n in found))
        if info["routes"]["reconstruct"]:
            result = mae.reconstruct(paths[0], mask_ratio=0.75, seed=0)
            args.out.write_bytes(result.images["pasted"])
            print(f"reconstruction of {paths[0].stem} (seed {result.seed}, mse on masked patches "
                  f"{result.mse_masked:.4f}) written to {args.out}")


if __name__ == "__main__":
    main()
