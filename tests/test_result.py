import errno
import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from flawscope.engine import save_results, warn_if_saved_among_inputs
from flawscope.inference import result as result_module
from flawscope.errors import FlawscopeError
from flawscope.inference.result import AnomalyResult, Region, rle_decode, rle_encode

H, W = 48, 64  # big enough that the score label (top-left) misses the blobs


def _two_blobs() -> np.ndarray:
    amap = np.full((H, W), 0.1, np.float32)
    amap[22:26, 3:9] = 0.7  # blob A: 4 x 6 = 24 pixels
    amap[23, 4] = 0.9
    amap[30:33, 40:46] = 0.5  # blob B: exactly at the threshold, still defective (>=)
    amap[31, 42] = 0.6
    return amap


def _read(path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.array(picture)


def _result(amap=None, score=0.73, **kwargs) -> AnomalyResult:
    amap = _two_blobs() if amap is None else amap
    image = np.full((*amap.shape, 3), 128, np.uint8)
    kwargs.setdefault("input_path", "/data/parts/part_007.png")
    return AnomalyResult.from_map(image, amap, raw_score=3.2, score=score, model_name="STFPM",
                                  **kwargs)


def test_regions_from_two_blobs():
    result = _result()
    assert result.size == (W, H)
    assert result.is_anomaly and result.threshold == 0.5
    assert result.pred.dtype == bool and result.pred.sum() == 24 + 18
    assert result.regions == [
        Region(bbox=[3, 22, 9, 26], area=24, max_score=float(np.float32(0.9))),
        Region(bbox=[40, 30, 46, 33], area=18, max_score=float(np.float32(0.6))),
    ]


def test_regions_are_8_connected_and_small_ones_can_be_dropped():
    amap = np.zeros((6, 6), np.float32)
    amap[1, 1] = amap[2, 2] = 0.8  # diagonal neighbours: one region
    amap[5, 5] = 0.6  # isolated pixel
    result = _result(amap)
    assert [r.area for r in result.regions] == [2, 1]
    filtered = _result(amap, min_region_area=2)
    assert [r.bbox for r in filtered.regions] == [[1, 1, 3, 3]]
    assert not filtered.pred[5, 5]  # removed from the mask too, not only from the list


def test_from_map_clips_and_checks_shapes():
    result = _result(_two_blobs() * 2 - 0.5)
    assert result.map.dtype == np.float32
    assert result.map.min() == 0.0 and result.map.max() == 1.0
    assert not _result(score=0.4999).is_anomaly and _result(score=0.5).is_anomaly
    with pytest.raises(ValueError):
        AnomalyResult.from_map(np.zeros((H, W + 1, 3), np.uint8), _two_blobs(), 1.0, 0.4, "m")


def test_rle_is_coco_column_major():
    assert rle_encode(np.array([[0, 1], [1, 1]], bool)) == {"size": [2, 2], "counts": [1, 3]}
    assert rle_encode(np.array([[1, 0], [0, 0]], bool)) == {"size": [2, 2], "counts": [0, 1, 3]}
    assert rle_encode(np.zeros((2, 3), bool)) == {"size": [2, 3], "counts": [6]}
    mask = np.random.default_rng(0).random((7, 5)) > 0.5
    np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)


def test_json_round_trip(tmp_path):
    result = _result()
    path = result.save_to_json(tmp_path / "new" / "dir")
    assert path == tmp_path / "new" / "dir" / "part_007_res.json"
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result.json))
    assert data["size"] == [W, H] and data["score"] == 0.73 and data["is_anomaly"] is True
    assert data["regions"][0] == {"bbox": [3, 22, 9, 26], "area": 24,
                                  "max_score": float(np.float32(0.9))}
    assert "map" not in data and data["error"] is None
    np.testing.assert_array_equal(rle_decode(data["pred"]), result.pred)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind

    listed = json.loads(result.save_to_json(tmp_path / "x.json", arrays="list").read_text())
    np.testing.assert_array_equal(np.array(listed["pred"], bool), result.pred)
    np.testing.assert_allclose(listed["map"], result.map, atol=1e-4)
    assert "pred" not in result.to_json("none")


def test_json_png_arrays(tmp_path):
    result = _result(input_path=None)
    path = result.save_to_json(tmp_path, arrays="png")
    assert path.name == "result_res.json"
    data = json.loads(path.read_text())
    assert data["map"] == "result_res.map.png" and data["pred"] == "result_res.pred.png"
    map16 = _read(tmp_path / data["map"])
    assert map16.dtype == np.uint16
    np.testing.assert_allclose(map16 / 65535, result.map, atol=1 / 65535)
    np.testing.assert_array_equal(_read(tmp_path / data["pred"]) > 0, result.pred)


def test_json_arrays_and_pictures_never_share_a_file(tmp_path):
    """save_to_json("x.json", arrays="png") beside save_to_img("x.png", extra=True): five files."""
    result = _result()
    written = [result.save_to_json(tmp_path / "x.json", arrays="png"), *result.save_to_img(tmp_path / "x.png", extra=True)]
    data = json.loads(written[0].read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["x.json", data["map"], data["pred"], "x.png", "x_map.png", "x_pred.png"])
    assert _read(tmp_path / data["map"]).dtype == np.uint16  # not overwritten by the jet picture


def test_save_defaults_come_from_the_result_and_long_names_fit(tmp_path):
    result = _result(input_path="/data/" + "é" * 200 + ".png")  # 400 bytes of UTF-8
    result.json_arrays, result.save_extra = "png", True
    json_path, pictures = result.save_to_json(tmp_path), result.save_to_img(tmp_path)
    assert len(pictures) == 3 and all(len(p.name.encode()) <= 255 for p in [json_path, *pictures])
    assert json.loads(json_path.read_text())["map"].endswith(".map.png")
    assert result.stem == "é" * 100
    with pytest.raises(FlawscopeError, match=r"x\.jpg: save_to_img writes PNG files"):
        result.save_to_img(tmp_path / "x.jpg")
    assert result.save_to_json(tmp_path / "sub.png") == tmp_path / "sub.png" / f"{result.stem}_res.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([json_path.name, "é" * 100 + "_res.map.png", "sub.png",
                                                                 "é" * 100 + "_res.pred.png", *(p.name for p in pictures)])


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk's OSError names no file; the CLI's one-line error needs the one being written."""
    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(result_module.os, "replace", full_disk)
    with pytest.raises(OSError) as caught:
        _result().save_to_json(tmp_path / "x.json")
    assert caught.value.filename == str(tmp_path / "x.json") and caught.value.strerror == "No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_the_label_rounds_the_score_but_never_across_the_threshold():
    assert _result(score=0.4996)._label_text() == "score 0.49 OK"
    assert _result(score=0.5)._label_text() == "score 0.50 ANOMALY"
    assert _result(score=0.59996)._label_text() == "score 0.60 ANOMALY"
    assert _result(score=0.286)._label_text() == "score 0.29 OK"
    assert _result(score=0.5001, threshold=0.505)._label_text() == "score 0.50 OK"
    assert _result(score=0.5051, threshold=0.505)._label_text() == "score 0.51 ANOMALY"


def test_save_to_img(tmp_path):
    result = _result()
    (path,) = result.save_to_img(tmp_path)
    assert path.name == "part_007_res.png"
    picture = _read(path)
    assert picture.shape == (H, W, 3)
    assert tuple(picture[25, 5]) == (255, 0, 0)  # outline of blob A (its bottom rows)
    assert tuple(picture[31, 43]) == (255, 0, 0)  # blob B is thin: all outline
    background = picture[45, 60]
    assert background[2] > background[0]  # jet-blue overlay on grey, no outline
    assert tuple(picture[1, 1]) == (255, 0, 0)  # corner of the red "ANOMALY" label
    paths = result.save_to_img(tmp_path / "out.png", extra=True)
    assert [p.name for p in paths] == ["out.png", "out_map.png", "out_pred.png"]
    assert [_read(p).shape for p in paths] == [(H, W, 3), (H, W, 3), (H, W)]  # pred: L


def test_picture_helpers_match_their_float_definitions():
    """The picture is built in uint8/uint16 pieces (a camera image has no room for float64 copies);
    it must be the same picture as the plain float definitions, pixel for pixel."""
    rng = np.random.default_rng(0)
    amap = rng.random((600, 70), dtype=np.float32)
    amap[:3] = [[0.0], [1.0], [np.nextafter(np.float32(1), np.float32(0))]]
    amap[3, :5] = np.arange(5, dtype=np.float32) / 256  # on the colour table's bin edges
    heat = result_module._jet(amap)
    np.testing.assert_array_equal(heat, matplotlib.colormaps["jet"](amap, bytes=True)[..., :3])

    image = rng.integers(0, 256, (600, 70, 3), dtype=np.uint8)
    image[0, :, 0], heat[0, :, 0] = np.arange(70) * 3, 255 - np.arange(70) * 3
    expected = np.round(0.6 * image + 0.4 * heat).astype(np.uint8)
    np.testing.assert_array_equal(result_module._blend(image, heat), expected)

    mask = np.zeros((600, 70), bool)
    mask[300:320, 10:30] = True  # a block: outline only where its 2-pixel band is
    mask[318:330, 31:33] = True  # another region, one pixel apart, reaching below the first
    mask[590:, 60:] = True  # touches the image's corner: closed there
    picture = np.zeros((600, 70, 3), np.uint8)
    result_module._draw_outline(picture, mask, 2)
    band = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=2, border_value=0)
    np.testing.assert_array_equal(np.all(picture == (255, 0, 0), axis=2), band)


def test_print_summarises_arrays(capsys):
    amap = np.zeros((512, 512), np.float32)
    amap[::20, ::20] = 0.9  # 676 one-pixel regions
    result = _result(amap)
    result.print(format_json=False)
    out = capsys.readouterr().out
    assert out.startswith("{'res': {'input_path': '/data/parts/part_007.png'")
    assert "'map': 'array(512x512, float32, min=0, max=0.9)'" in out
    assert "'pred': 'array(512x512, bool, 676 true)'" in out
    assert "... 673 more" in out
    assert len(out) < 2000 and str(result) == out.rstrip("\n")
    assert "regions=676" in repr(result)


def test_paddlex_result_code_runs_as_written(tmp_path, capsys):
    """PaddleX's documented loop (keyword save_path, print's JSON options) and its dict access."""
    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 10:20] = 0.9
    result = _result(amap)
    result.input_path = "/data/部品/part_007.png"
    result.print(format_json=True, indent=2, ensure_ascii=False)
    printed = json.loads(capsys.readouterr().out)["res"]
    assert printed["input_path"] == result.input_path and printed["map"].startswith("array(64x64")
    assert printed["regions"] == [{"bbox": [10, 10, 20, 20], "area": 100, "max_score": 0.9}]
    assert result.save_to_img(save_path=tmp_path) == [tmp_path / "part_007_res.png"]
    path = result.save_to_json(save_path=tmp_path, indent=4, ensure_ascii=False)
    text = path.read_text(encoding="utf-8")
    assert "部品" in text and "\n    \"input_path\"" in text and json.loads(text)["score"] == result.score
    assert result["input_path"] == result.input_path and result["pred"] is result.pred
    assert set(dict(result)) == set(result.keys()) >= {"score", "is_anomaly", "map", "pred", "regions"}
    with pytest.raises(KeyError, match="'bboxes': a result holds input_path"):
        result["bboxes"]
    assert "score" in result and "bboxes" not in result and list(result) == result.keys()
    assert np.array([result, result]).shape == (2,)  # results, not a table of their keys
    assert result.get("score") == result.score and result.get("bboxes", 0) == 0
    assert dict(result.items())["pred"] is result.pred and result.values()[0] == result.input_path
    assert result != _result(amap) and len({result, result}) == 1  # identity, hashable: no array comparison


def test_error_result_serialises(tmp_path):
    result = AnomalyResult.from_error("broken.png", "broken.png: cannot identify image file")
    assert result.size is None and result.img == {}
    data = json.loads(result.save_to_json(tmp_path, arrays="png").read_text())
    assert data["error"] == "broken.png: cannot identify image file"
    assert data["score"] is None and data["is_anomaly"] is None and data["regions"] == []
    assert "pred" not in data and "map" not in data
    assert result.save_all(tmp_path) == [tmp_path / "broken_res.json"]
    assert "cannot identify" in str(result)


def _four_blobs_worst_later() -> np.ndarray:
    """Four blobs whose raster (label) order, area order and score order all differ."""
    amap = np.full((H, W), 0.1, np.float32)
    amap[4:8, 4:14] = 0.6  # A: first in raster order, 40 px, peak 0.6
    amap[14:16, 40:43] = 0.95  # B: second, 6 px, the worst
    amap[24:27, 10:15] = 0.7  # C: third, 15 px
    amap[25, 12] = 0.8  # ... peak 0.8
    amap[36:39, 30:37] = 0.6  # E: last, 21 px, ties with A
    return amap


def test_regions_are_listed_worst_first_in_the_result_and_its_json(tmp_path):
    """Regions are sorted by peak score, highest first (ties keep raster order), not in label order."""
    result = _result(_four_blobs_worst_later())
    a = Region(bbox=[4, 4, 14, 8], area=40, max_score=float(np.float32(0.6)))
    b = Region(bbox=[40, 14, 43, 16], area=6, max_score=float(np.float32(0.95)))
    c = Region(bbox=[10, 24, 15, 27], area=15, max_score=float(np.float32(0.8)))
    e = Region(bbox=[30, 36, 37, 39], area=21, max_score=float(np.float32(0.6)))
    assert result.regions == [b, c, a, e]  # label order would be a, b, c, e; area order a, e, c, b

    expected = [{"bbox": r.bbox, "area": r.area, "max_score": r.max_score} for r in (b, c, a, e)]
    assert result.to_json()["regions"] == expected
    saved = json.loads(result.save_to_json(tmp_path / "r.json").read_text())
    assert saved["regions"] == expected
    assert result.summary(max_regions=1)["regions"] == [
        {"bbox": b.bbox, "area": 6, "max_score": 0.95}, "... 3 more"]  # a truncated listing leads with the worst


def test_a_file_name_that_is_not_utf8_is_saved(tmp_path):
    """A Latin-1 "café.png" reaches Python as a lone surrogate, which no UTF-8 name can hold."""
    result = _result(input_path=os.fsdecode(b"/data/caf\xe9.png"))
    assert result.stem == "caf\ufffd"
    written = [result.save_to_json(tmp_path), *result.save_to_img(tmp_path, extra=True),
               result.save_to_json(tmp_path / "x.json"), *result.save_to_img(tmp_path / "x.png")]
    assert [p.name for p in written] == ["caf\ufffd_res.json", "caf\ufffd_res.png", "caf\ufffd_map.png",
                                         "caf\ufffd_pred.png", "x.json", "x.png"]
    assert json.loads(written[0].read_text())["input_path"] == result.input_path


@pytest.mark.parametrize("arrays", ["rle", "list", "none", "png"])
def test_the_json_property_is_what_the_file_holds(tmp_path, arrays):
    result = _result()
    result.json_arrays = arrays
    saved = json.loads(result.save_to_json(tmp_path).read_text())
    if arrays == "png":  # the arrays are files, named only once written
        del saved["map"], saved["pred"]
    assert result.json == saved


def test_the_printed_score_never_contradicts_the_decision(tmp_path, capsys):
    assert _result(score=0.49996).score_text(3) == "0.499" and _result(score=0.5).score_text(3) == "0.500"
    assert _result(score=0.2864).score_text(3) == "0.286"
    save_results([_result(score=0.49996, input_path="x.png"), _result(score=0.50001, input_path="y.png")], tmp_path)
    assert capsys.readouterr().out.splitlines() == ["x.png\tscore=0.499\tis_anomaly=False",
                                                    "y.png\tscore=0.500\tis_anomaly=True"]


def test_a_name_that_is_not_utf8_prints_escaped(tmp_path, capsys):
    name = os.fsdecode(b"caf\xe9.png")
    save_results([_result(input_path=name), AnomalyResult.from_error(name, f"{name}: broken")], tmp_path)
    assert capsys.readouterr().out.splitlines() == ["caf\\udce9.png\tscore=0.730\tis_anomaly=True",
                                                    "caf\\udce9.png\terror: broken"]
    _result(input_path=name).print()  # JSON, as PaddleX prints, with ensure_ascii=False
    assert json.loads(capsys.readouterr().out)["res"]["input_path"] == name


@pytest.mark.parametrize("parent", ["", "sub/"])
def test_saving_under_a_file_names_that_file(tmp_path, parent):
    """The parent folder is a file: the error names it, not the hidden temp file the cleanup tried."""
    (tmp_path / "report").write_text("a file, not a folder\n")
    result = _result()
    for save in (lambda: result.save_to_json(tmp_path / "report" / f"{parent}x.json"),
                 lambda: result.save_to_img(tmp_path / "report" / parent)):
        with pytest.raises(NotADirectoryError, match="a file, not a folder") as error:
            save()
        assert error.value.filename == str(tmp_path / "report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_save_all_returns_every_file_it_writes(tmp_path):
    result = _result(input_path="/data/a.png")
    result.json_arrays, result.save_extra = "png", True
    written = result.save_all(tmp_path)
    assert sorted(written) == sorted(tmp_path.iterdir())
    assert sorted(p.name for p in written) == ["a_map.png", "a_pred.png", "a_res.json", "a_res.map.png",
                                               "a_res.png", "a_res.pred.png"]


@pytest.mark.parametrize("failing", ["a_res.json", "a_res.map.png", "a_res.png", "a_pred.png"])
def test_save_all_writes_all_or_none(tmp_path, monkeypatch, failing):
    """A disk that fills up on one of a result's files leaves none of them (it left the JSON of a
    result without its picture), also where an earlier run's files of that name were there."""
    result = _result(input_path="/data/a.png")
    result.json_arrays, result.save_extra = "png", True
    result.save_all(tmp_path)  # an earlier run's
    real = result_module.write_atomic

    def fill_up(path, data):
        if Path(path).name == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(result_module, "write_atomic", fill_up)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        result.save_all(tmp_path, "a")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given, save, recursive, warned", [
    ("parts", "parts", False, True),  # beside the inputs: the next run over parts/ reads them
    ("parts", "parts/out", True, True),  # a recursive run over parts/ reads parts/out/
    ("parts", "parts/out", False, False),  # one that does not descend does not
    (["parts/a.png", "parts"], "parts", False, True),
    ("parts/a.png", "parts", False, False),  # one image: a run over it reads only it
    ("parts", "elsewhere", True, False),
    ("parts/*.png", "parts", False, True),  # the pictures saved there match
    ("parts/*.jpg", "parts", False, False),
    ("parts/**/*.png", "parts/out", False, True),
])
def test_saving_where_a_later_run_reads_the_results_warns(tmp_path, monkeypatch, caplog, given, save, recursive,
                                                          warned):
    """The saved pictures would be scored as parts, as by PaddleX: said, not skipped by name."""
    monkeypatch.chdir(tmp_path)
    Path("parts").mkdir()
    Path("parts/a.png").write_bytes(b"")
    warn_if_saved_among_inputs(given, Path(save), recursive)
    assert caplog.text.count("will read them as inputs") == int(warned)


@pytest.mark.parametrize(("url", "stem"), [
    ("http://cam/a/part.jpg?v=1.2", "part"),  # the query is no part of the name (it gave "part.jpg?v=1")
    ("http://cam/img?id=3&cam=2", "img"),
    ("http://127.0.0.1:8765/", "download"),  # no name at all: not "127.0.0"
    ("http://cam/%E9%83%A8%E5%93%81.jpg", "部品"),  # decoded
    ("https://cam/a%2F..%2F..%2Fsecret.jpg", "secret"),  # an encoded slash names no other folder
])
def test_a_url_gives_its_file_name(url, stem):
    assert _result(input_path=url).stem == stem
