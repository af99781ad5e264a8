"""Readers held to bounds (issue #27): every file a command reads that someone else wrote goes
through a bounded reader. FIFOs and devices where a file is expected are refused instead of
waited on; zip members are checked for size and inflation before they are decompressed, and a
damaged, encrypted or oddly compressed member is one line; trackers and sample folders stay
inside what the run owns. Each case: one `error:` line, its exit code, nothing anywhere changed
(the corpus's snapshot), and within a time bound where the failure would be a hang."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from corpus import EXTEND, RUN, Case, World, check_ids, run_case
from test_fid import images_like, write_folder

from conftest import checkout_env
from disback_cli.errors import DisbackError
from disback_cli.evaluation.image_io import _decode
from disback_cli.models.ratio import RatioSpec, build_ratio
from disback_cli.models.text_to_image.text import read_prompts
from disback_cli.store.archives import read_member
from disback_cli.store.images import encode_png
from disback_cli.store.sample_writers import PngFolder

DIGITS = ["--dataset", "digits"]


def digits_folder(w: World, name: str = "imgs", count: int = 4) -> str:
    write_folder(w / name, images_like(count, 1, size=8, channels=1))
    return name


def fifo_in_folder(w: World) -> list[str]:
    folder = digits_folder(w)
    os.mkfifo(w / folder / "z-fifo.png")
    return ["evaluate", folder, "--any-images", *DIGITS]


def zip_of(w: World, name: str, members: dict[str, bytes], level: int = 6) -> str:
    with zipfile.ZipFile(w / name, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return name


def png_bytes(seed: int = 0) -> bytes:
    return encode_png(images_like(1, seed, size=8, channels=1)[0])


def zip_bomb(w: World) -> list[str]:
    """A 100 MB member of zeros stored in about 100 kB."""
    name = zip_of(w, "bomb.zip", {"a.png": png_bytes(), "b.png": bytes(100 << 20)}, level=9)
    return ["evaluate", name, *DIGITS]


def patched_zip(w: World, patch) -> list[str]:
    """A zip of two PNGs with `patch(data, local_offset, central_offset)` applied to its bytes
    (offsets of the second member's local and central headers)."""
    name = zip_of(w, "d.zip", {"a.png": png_bytes(0), "b.png": png_bytes(1)}, level=0)
    data = bytearray((w / name).read_bytes())
    with zipfile.ZipFile(w / name) as archive:
        local = archive.getinfo("b.png").header_offset
    central = data.rfind(b"PK\x01\x02")  # the last central entry: b.png
    patch(data, local, central)
    (w / name).write_bytes(bytes(data))
    return ["evaluate", name, *DIGITS]


def bad_crc(data: bytearray, local: int, central: int) -> None:
    name_length, extra_length = struct.unpack_from("<HH", data, local + 26)
    data[local + 30 + name_length + extra_length + 40] ^= 0xFF  # inside the stored PNG


def encrypted(data: bytearray, local: int, central: int) -> None:
    for at in (local + 6, central + 8):  # general-purpose flag bit 0 in both headers
        data[at] |= 0x1


def unknown_method(data: bytearray, local: int, central: int) -> None:
    for at in (local + 8, central + 10):
        struct.pack_into("<H", data, at, 99)


def npz_bomb(w: World) -> list[str]:
    path = w / "bomb.npz"
    np.savez_compressed(path, samples=np.zeros((1 << 24, 2), dtype=np.float32))
    return ["evaluate", "bomb.npz", "--dataset", "ring2d"]


def linked_tracker(w: World) -> list[str]:
    (w / RUN / "tensorboard").symlink_to(w / "outside" / "dir")
    return [*EXTEND, "--log-to", "tensorboard"]


CASES = [
    Case("an image that is a FIFO", fifo_in_folder, "not a regular file"),
    Case("a zip member that inflates 1000 times", zip_bomb, "a zip bomb?"),
    Case("a zip member with a bad CRC", lambda w: patched_zip(w, bad_crc), "b.png: unreadable"),
    Case("an encrypted zip member", lambda w: patched_zip(w, encrypted), "encrypted"),
    Case("an unknown compression", lambda w: patched_zip(w, unknown_method), "b.png: unreadable"),
    Case("an npz array that inflates 1000 times", npz_bomb, "a zip bomb?"),
]
check_ids(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_file_is_refused_in_one_line(case, template, tmp_path, monkeypatch, cli):
    run_case(case, template, tmp_path, monkeypatch, cli)


def test_tracker_folders_are_not_followed_out_of_the_run(template, tmp_path, monkeypatch, cli):
    pytest.importorskip("torch.utils.tensorboard")
    case = Case("a tensorboard folder linked elsewhere", linked_tracker, "is a symbolic link")
    run_case(case, template, tmp_path, monkeypatch, cli)


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    """In a subprocess with a time bound: a regression here would hang, not fail."""
    write_folder(tmp_path / "imgs", images_like(3, 1, size=8, channels=1))
    os.mkfifo(tmp_path / "imgs" / "z.png")
    done = subprocess.run(
        [sys.executable, "-m", "disback_cli", "evaluate", "imgs", "--any-images", *DIGITS],
        cwd=tmp_path,
        env=checkout_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "not a regular file" in done.stderr


def test_a_member_that_lies_about_its_size_is_refused(tmp_path):
    """The zip library reads no more than the declared size; the data then fail their CRC."""
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.png", b"x" * 5000)
    with zipfile.ZipFile(path) as archive:
        archive.getinfo("a.png").file_size = 10  # the central directory's word, not the data's
        with pytest.raises(DisbackError, match=r"unreadable zip member .*CRC"):
            read_member(archive, "a.png", 100, "x.zip:a.png")


def test_sixteen_bit_images_keep_their_values():
    """A 16-bit grey PNG decodes to its high byte (it decoded as all white)."""
    from io import BytesIO

    from PIL import Image

    values = np.array([[0, 256, 32768], [65535, 4096, 512]], dtype=np.uint16)
    buffer = BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    decoded = _decode(buffer.getvalue(), "grey16.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 3, 1)
    assert decoded[:, :, 0].tolist() == (values >> 8).tolist()


def test_a_canvas_too_large_is_refused_before_decoding():
    header = zlib.compress(b"\x00" * 64)
    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)  # 10^8 grey pixels

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    data = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", header) + chunk(b"IEND", b"")
    )
    with pytest.raises(DisbackError, match="more than an image may hold"):
        _decode(data, "huge.png")


@pytest.mark.parametrize("width", [6, 12, 20, 24])
def test_every_documented_ratio_width_builds_and_runs(width):
    import torch

    spec = RatioSpec(arch="conv", data_shape=(1, 8, 8), label_dim=0, width=width, depth=3)
    network = build_ratio(spec)
    assert network(torch.zeros(2, 1, 8, 8), torch.ones(2)).shape == (2,)


def test_prompt_files_with_a_byte_order_mark_or_a_leading_bracket(tmp_path):
    listing = tmp_path / "p.json"
    listing.write_bytes(b"\xef\xbb\xbf" + json.dumps(["a cat", "a dog", "[x] y"]).encode())
    assert read_prompts(listing)[0] == ["a cat", "a dog", "[x] y"]
    text = tmp_path / "p.txt"
    text.write_text("[draft] a red cat\na blue dog\n")
    assert read_prompts(text)[0] == ["[draft] a red cat", "a blue dog"]
    bad = tmp_path / "q.json"
    bad.write_text('["a cat", 3]')
    with pytest.raises(DisbackError, match="list of strings"):
        read_prompts(bad)


def test_a_sample_folder_has_one_writer(tmp_path):
    """While one `sample` writes a folder, a second one is refused, naming the first."""
    out = tmp_path / "samples"
    first = PngFolder(out, [0, 1], {})
    with first.lock(True, print):
        second = PngFolder(out, [5], {})
        with pytest.raises(DisbackError, match="disback sample"), second.lock(True, print):
            pass
        first.check()  # its own lock is no foreign file
        assert first.start() == 0
    assert not out.exists() or not (out / ".lock").exists()


def test_runs_shows_control_characters_escaped(tmp_path, small_trajectory, cli):
    import shutil

    for name in ("t\x1b[31mred", "u"):  # folder names anyone may choose
        shutil.copytree(small_trajectory, tmp_path / name)
        run = ["-T", tmp_path / name, "--iters", "10", "--save-every", "10", "--batch", "32"]
        done = cli("backtrack", *run)
        assert done.code == 0, done.stderr
    shown = cli("runs", tmp_path).stdout
    assert "\x1b" not in shown, repr(shown)
    assert "t\\x1b[31mred" in shown


# --- text-to-image folders: what transformers and diffusers would build from is checked first


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from t2i_fixtures import make_sd_folder, write_prompts

    root = tmp_path_factory.mktemp("sd")
    write_prompts(root / "prompts.txt")
    return make_sd_folder(root / "sd")


def spoiled(sd_folder, tmp_path, spoil) -> str:
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    spoil(folder)
    return str(folder)


def set_config(path, **values) -> None:
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


def nan_weights(path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    save_file(tensors, str(path))


def empty_tokenizer(folder) -> None:
    for path in (folder / "tokenizer").iterdir():
        if path.name != "tokenizer_config.json":
            path.unlink()


def fifo_tokenizer(folder) -> None:
    (folder / "tokenizer" / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer" / "tokenizer.json")


FOLDER_CASES = {
    "sample_size an empty list": (
        lambda f: set_config(f / "unet" / "config.json", sample_size=[]),
        "sample_size [] is not a positive size",
    ),
    "sample_size null": (
        lambda f: set_config(f / "unet" / "config.json", sample_size=None),
        "sample_size None is not a positive size",
    ),
    "sample_size an object": (
        lambda f: set_config(f / "unet" / "config.json", sample_size={}),
        "is not a positive size",
    ),
    "a tokenizer without its vocabulary": (empty_tokenizer, "no vocabulary"),
    "a tokenizer file that is a FIFO": (fifo_tokenizer, "not a regular file"),
    "a million-layer text encoder": (
        lambda f: set_config(f / "text_encoder" / "config.json", num_hidden_layers=10**6),
        "num_hidden_layers = 1000000 is too large",
    ),
    "a text encoder config its weights do not fit": (
        lambda f: set_config(f / "text_encoder" / "config.json", intermediate_size=4096),
        "the text encoder weights do not fit its config",
    ),
    "NaN text-encoder weights": (
        lambda f: nan_weights(f / "text_encoder" / "model.safetensors"),
        "holds NaN or infinite values",
    ),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_spoiled_model_folder_is_refused_before_anything_is_written(
    case, sd_folder, tmp_path, cli
):
    spoil, message = FOLDER_CASES[case]
    teacher = spoiled(sd_folder, tmp_path, spoil)
    prompts = sd_folder.parent / "prompts.txt"
    short = ["--iters", "2", "--nodes", "1", "--batch", "2"]
    done = cli(
        "record", "--teacher", teacher, "--prompts", prompts, "--out", tmp_path / "t", *short
    )
    assert done.code == 1 and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "t").exists()


def test_a_vae_config_its_weights_do_not_fit_is_refused_before_it_is_built(
    sd_folder, tmp_path, cli
):
    """Wide VAE blocks in a 2 kB config: refused on the meta device, nothing allocated."""
    teacher = spoiled(
        sd_folder,
        tmp_path,
        lambda f: set_config(f / "vae" / "config.json", block_out_channels=[2048, 4096]),
    )
    prompts = sd_folder.parent / "prompts.txt"
    run = ["--teacher", teacher, "--prompts", prompts, "-n", "1", "--steps", "2"]
    done = cli("sample", *run, "--out", tmp_path / "s")
    assert done.code == 1 and "the VAE weights do not fit its config" in done.stderr, done.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"projection_dim": 10**9}, "is too large"),
        ({"projection_dim": 64}, "the CLIP weights do not fit its config"),
    ],
)
def test_a_clip_folder_is_counted_before_it_is_built(tmp_path, change, message):
    pytest.importorskip("transformers")
    from t2i_fixtures import make_clip_folder

    from disback_cli.evaluation.clip_score import ClipScorer

    folder = make_clip_folder(tmp_path / "clip")
    set_config(folder / "config.json", **change)
    with pytest.raises(DisbackError, match=message):
        ClipScorer(folder, "cpu")


RECORDED_SPOILS = {
    "sample_size an empty list": lambda f: set_config(f / "unet" / "config.json", sample_size=[]),
    "a million-layer text encoder": lambda f: set_config(
        f / "text_encoder" / "config.json", num_hidden_layers=10**6
    ),
    "a tokenizer file added": lambda f: (f / "tokenizer" / "added_tokens.json").write_text("{}"),
    "a tokenizer without its vocabulary": empty_tokenizer,
}


@pytest.mark.parametrize("xl", [False, True])
@pytest.mark.parametrize("case", list(RECORDED_SPOILS))
def test_a_recorded_folder_changed_since_is_refused_by_its_hash_before_parsing(
    case, xl, sd_folder, tmp_path
):
    """A trajectory's teacher folder is hashed from its listing alone and compared before any
    config is read: what the changed configs would do (crash, allocate, refuse otherwise) never
    happens. An unchanged copy elsewhere is the same teacher."""
    from t2i_fixtures import make_sd_folder

    from disback_cli.models.teachers import open_teacher

    pristine = make_sd_folder(tmp_path / "xl", xl=True) if xl else sd_folder
    recorded = open_teacher(str(pristine)).sha256
    copy = spoiled(pristine, tmp_path / "copy", lambda f: None)
    assert open_teacher(copy, "cpu", recorded, recorded_in="t").sha256 == recorded
    changed = spoiled(pristine, tmp_path / "changed", RECORDED_SPOILS[case])
    with pytest.raises(DisbackError) as caught:
        open_teacher(changed, "cpu", recorded, recorded_in="t")
    assert (
        str(caught.value)
        == f"teacher {changed} is not the one t was recorded with (sha256 differs)"
    )


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (
            lambda f: set_config(f / "vae" / "config.json", block_out_channels=[2048, 4096]),
            "vae/config.json: not the file the generator was trained with (sha256 differs",
        ),
        (
            lambda f: (f / "tokenizer" / "added_tokens.json").write_text("{}"),
            "its text encoder and VAE files are not those the generator was trained with",
        ),
        (
            lambda f: (f / "vae" / "config.json").unlink(),
            "vae/config.json: missing (moved? pass --model-folder)",
        ),
    ],
)
def test_a_generators_text_encoder_and_vae_are_compared_before_they_are_parsed(
    spoil, message, sd_folder, tmp_path
):
    from disback_cli.models.text_to_image.folder import read_folder
    from disback_cli.models.text_to_image.sampling import open_sampling, sampling_info

    info = sampling_info(read_folder(sd_folder))
    encoder, _ = open_sampling(
        info, "cpu", True, spoiled(sd_folder, tmp_path / "a", lambda f: None)
    )
    assert encoder.folder.root == tmp_path / "a" / "sd"  # an unchanged copy elsewhere is fine
    changed = spoiled(sd_folder, tmp_path / "b", spoil)
    with pytest.raises(DisbackError) as caught:
        open_sampling(info, "cpu", True, changed)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["../outside.json", "unet/config.json", "/etc/passwd", "vae"])
def test_a_generator_naming_a_file_outside_its_components_is_refused(name, sd_folder):
    from disback_cli.models.text_to_image.folder import read_folder
    from disback_cli.models.text_to_image.sampling import open_sampling, sampling_info

    info = sampling_info(read_folder(sd_folder))
    info["files"][name] = "0" * 64
    with pytest.raises(DisbackError, match="not a model file"):
        open_sampling(info, "cpu", True)
