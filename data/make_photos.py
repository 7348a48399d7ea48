"""Build the bundled photo set `data/photos/{train,val}/<class>/*.png` from scikit-image's sample photographs.

A tiny ImageFolder of real, public-domain / CC0 photographs, so the tokenizer can be trained, evaluated and tested
on CPU without ImageNet (the paper, arXiv 2411.16681, trains on ImageNet-1k; Sec. 4.1). One class per source photo.
The val images come from a region of each photo that no train image contains:

    resize the photo to width --width (aspect kept, Lanczos)
    | train region: columns [0, W - val_width - gap) | gap (unused) | val strip: last val_width columns |
    train tiles: a 2-D grid of --train-tile squares covering the train region (neighbours overlap)
    val tiles:   --val-tile squares stacked down the val strip (neighbours overlap when H is not a multiple)

The unused gap keeps the resampling kernel of the resize from blending val pixels into train pixels.

Run (after `pip download --no-deps scikit-image==0.26.0 -d /tmp/sk && cd /tmp/sk && unzip -q scikit_image-*.whl`):
    python data/make_photos.py --skimage-data /tmp/sk/skimage/data
It checks each source file's SHA-256 against the values below (copied from skimage/data/_registry.py), wipes
`<out>/train` and `<out>/val`, and writes the same bytes on every run with the same Pillow version.
"""
import argparse
import hashlib
import math
import os
import shutil

from PIL import Image

# class name -> (file in skimage/data, SHA-256 from skimage/data/_registry.py). Licences are listed in data/README.md.
SOURCES = {
    "astronaut": ("astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    "brick": ("brick.png", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf"),
    "camera": ("camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
    "chelsea": ("chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    "clock": ("clock_motion.png", "f029226b28b642e80113d86622e9b215ee067a0966feaf5e60604a1e05733955"),
    "coffee": ("coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    "coins": ("coins.png", "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba"),
    "grass": ("grass.png", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89"),
    "gravel": ("gravel.png", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12"),
    "hubble": ("hubble_deep_field.jpg", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    "rocket": ("rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
}


def positions(length, tile):
    """Evenly spaced offsets of `tile`-sized windows that cover [0, length) exactly, first at 0, last flush right."""
    n = math.ceil(length / tile)  # fewest windows that cover the length
    if n == 1:
        return [0]
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def split_photo(img, width, val_width, gap, train_tile, val_tile):
    """Resize one RGB photo and cut it into train tiles and val tiles; returns (train, val) lists of PIL images."""
    height = round(img.height * width / img.width)  # keep the aspect ratio
    img = img.resize((width, height), Image.LANCZOS)
    train_w = width - val_width - gap
    assert train_w >= train_tile and height >= train_tile, f"photo too small: train region {train_w}x{height}"
    assert val_width == val_tile, f"val strip width {val_width} must equal --val-tile {val_tile}"
    train = [img.crop((x, y, x + train_tile, y + train_tile))
             for y in positions(height, train_tile) for x in positions(train_w, train_tile)]
    x0 = width - val_width  # the val strip starts here; columns [train_w, x0) are the unused gap
    val = [img.crop((x0, y, x0 + val_tile, y + val_tile)) for y in positions(height, val_tile)]
    return train, val


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- input / output
    p.add_argument("--skimage-data", required=True, help="folder holding scikit-image's sample files (skimage/data)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "photos"),
                   help="output root; <out>/train and <out>/val are replaced")
    # --- geometry (defaults produce the committed files)
    p.add_argument("--width", type=int, default=512, help="every photo is resized to this width")
    p.add_argument("--val-width", type=int, default=128, help="width of the held-out right strip (25%% of 512)")
    p.add_argument("--gap", type=int, default=8, help="columns between train and val that go to neither")
    p.add_argument("--train-tile", type=int, default=256, help="side of the square train tiles")
    p.add_argument("--val-tile", type=int, default=128, help="side of the square val tiles")
    args = p.parse_args()

    for split in ("train", "val"):
        shutil.rmtree(os.path.join(args.out, split), ignore_errors=True)
    for name, (fname, sha) in SOURCES.items():
        path = os.path.join(args.skimage_data, fname)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert digest == sha, f"{path}: SHA-256 {digest} differs from scikit-image's registry value {sha}"
        img = Image.open(path).convert("RGB")  # grayscale photos become 3 equal channels
        train, val = split_photo(img, args.width, args.val_width, args.gap, args.train_tile, args.val_tile)
        for split, tiles in (("train", train), ("val", val)):
            folder = os.path.join(args.out, split, name)
            os.makedirs(folder, exist_ok=True)
            for j, tile in enumerate(tiles):
                tile.save(os.path.join(folder, f"{name}_{j}.png"), optimize=True)
        print(f"{name:10s} {fname:22s} {img.width}x{img.height} -> train {len(train)}, val {len(val)}")


if __name__ == "__main__":
    main()
