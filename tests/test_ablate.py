"""`vlmforge ablate`: a two-cell grid with two seeds, end to end, resumed, reported."""

import dataclasses
import json

import pytest
import yaml

from conftest import SMALL


def test_mean_ci_is_the_student_t_interval():
    from vlmforge.recipes.ablate import mean_ci

    m, h = mean_ci([50.0, 60.0, 70.0])  # sd 10, t(0.975, 2) = 4.303
    assert m == 60.0 and h == pytest.approx(4.303 * 10 / 3**0.5)
    assert mean_ci([42.0]) == (42.0, 0.0)


@pytest.mark.slow
def test_two_cell_ablation_runs_resumes_and_writes_the_table(tmp_path, monkeypatch, capsys):
    from vlmforge.cli import main
    from vlmforge.recipes import ablate as ab

    spec = dataclasses.asdict(SMALL)
    grid = {
        "name": "tiny",
        "seeds": 2,
        "budget": {
            "n_shapes": 24,
            "n_text": 8,
            "n_test": 8,
            "spec": spec,
            "batch_size": 8,
            "align": {"max_steps": 2},
            "sft": {"max_steps": 2},
        },
        "base": {"sft": {"lm_mode": "lora"}},
        "groups": {
            "connector": [
                {"name": "linear", "model": {"connector": "linear"}},
                {"name": "perceiver 4", "model": {"connector": "perceiver", "connector_latents": 4}},
            ],
            "again": [{"name": "linear again", "model": {"connector": "linear", "split_grid": 0}}],
        },
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    main(["ablate", "--grid", str(path), "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == ["again/linear again/seed0", "again/linear again/seed1"] + [
        f"connector/{c}/seed{s}" for c in ("linear", "perceiver 4") for s in (0, 1)
    ]
    # the same resolved configuration in another group is not trained twice
    pair = {"again/linear again/seed1", "connector/linear/seed1"}
    alias = [k for k in pair if "same_as" in results["runs"][k]]
    assert len(alias) == 1 and results["runs"][alias[0]]["same_as"] == (pair - set(alias)).pop()
    run = results["runs"]["connector/perceiver 4/seed0"]
    assert run["visual_tokens_per_image"] == 4
    assert results["runs"]["connector/linear/seed1"]["visual_tokens_per_image"] == 16
    assert 0 < run["trainable_params"] < run["total_params"] and 0 <= run["scores"]["shapes"] <= 1
    md = (out / "results.md").read_text()
    assert md in printed and "| linear |" in md and "| perceiver 4 |" in md and " ± " in md
    assert "Paper: perceiver 60.3" in md
    assert (out / "results.png").stat().st_size > 1000
    page = (out / "results.html").read_text()  # the same tables and the plot, in one page
    assert "<h2>connector</h2>" in page and "<td>perceiver 4</td>" in page and "data:image/png;base64," in page
    # finished runs are not re-run; a run lost mid-way is redone
    del results["runs"]["connector/linear/seed1"], results["runs"]["again/linear again/seed1"]
    (out / "results.json").write_text(json.dumps(results))
    calls = []
    real = ab.runner.run
    monkeypatch.setattr(ab.runner, "run", lambda plan, cell, *a: calls.append(cell.name) or real(plan, cell, *a))
    ab.ablate(str(path), out, jobs=1)
    assert len(calls) == 1 and calls[0] in ("linear", "linear again")  # one run serves both cells
    assert pair <= set(json.loads((out / "results.json").read_text())["runs"])
    with pytest.raises(ValueError, match="another grid, budget or eval tasks"):
        ab.ablate(str(path), out, quick=True)
    # in parallel, a failing cell stops the ablation with its own error
    monkeypatch.setattr(ab.runner, "run", real)
    grid["seeds"] = 1
    grid["groups"] = {"connector": [{"name": "bad", "model": {"connector": "nope"}}, {"name": "linear"}]}
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ValueError, match="unknown connector 'nope'"):
        ab.ablate(str(path), tmp_path / "out2", jobs=2)


def test_bad_grids_are_named(tmp_path):
    from vlmforge.recipes.ablate import load_grid

    with pytest.raises(FileNotFoundError, match="neither a built-in grid"):
        load_grid(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: {g: [{name: a, modle: {}}]}")
    with pytest.raises(ValueError, match=r"cell 'a' has unknown keys \['modle'\]"):
        load_grid(str(bad))
    bad.write_text("groups: {g: [{name: a}]}\nbudget: {n_shape: 3}")
    with pytest.raises(ValueError, match=r"unknown budget keys \['n_shape'\]"):
        load_grid(str(bad))
    bad.write_text("groups: {g: [{name: a}]}\nseed: 3")
    with pytest.raises(ValueError, match=r"unknown grid keys \['seed'\]"):
        load_grid(str(bad))
    bad.write_text("groups: [")
    with pytest.raises(ValueError, match="malformed YAML"):
        load_grid(str(bad))
    assert set(load_grid("idefics2").groups) == {"architecture", "connector", "splitting", "tower", "lm"}
    from vlmforge.recipes.ablate import ablate

    with pytest.raises(ValueError, match=r"grid 'idefics2' has no group 'nope' \(its groups: architecture, "):
        ablate(groups=["tower", "nope"], out=str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # refused before anything was made


@pytest.mark.slow
def test_ablation_on_own_data_a_qa_file_and_a_benchmark(tmp_path, data_dir, monkeypatch, capsys):
    """`data:` in the grid trains on the user's files; `--eval` scores on a QA file and a benchmark."""
    from test_benchmarks import cell, write_parquet
    from vlmforge.cli import main
    from vlmforge.recipes.ablate import FileTask, ablate, load_grid

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").symlink_to(data_dir)
    root = tmp_path / "bench"
    write_parquet(
        root / "textvqa/data/validation-00000-of-00001.parquet",
        [
            {
                "image_id": str(i),
                "question_id": i,
                "question": "what color?",
                "image": cell(c),
                "answers": [c] * 10,
                "ocr_tokens": [],
            }
            for i, c in enumerate(["red", "green", "blue", "yellow"])
        ],
    )
    grid = {
        "name": "own",
        "seeds": 1,
        "budget": {
            "n_shapes": 8,
            "n_text": 4,
            "n_test": 4,
            "spec": dataclasses.asdict(SMALL),
            "batch_size": 8,
            "sft": {"max_steps": 2},
        },
        "data": {"sft": ["d/shapes_sft.json"]},
        "eval": {"qa": "d/shapes_qa.json"},
        "groups": {"connector": [{"name": "linear", "model": {"connector": "linear"}}]},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    g = load_grid("grid.yaml")
    assert g.data == {"sft": [str(tmp_path / "d/shapes_sft.json")]}  # relative to the YAML
    assert g.eval == {"qa": FileTask(str(tmp_path / "d/shapes_qa.json"))}
    # unreadable tasks fail before any training
    for words, message in (
        (["textvqa"], "'textvqa' is a benchmark: give --data-root"),
        (["shapes", "nowhere.json"], f"eval task 'nowhere': no file {tmp_path / 'nowhere.json'}"),
    ):
        with pytest.raises(SystemExit):
            main(["ablate", "--grid", "grid.yaml", "--out", "o", "--eval", *words])
        assert message in capsys.readouterr().err and not (tmp_path / "o").exists()

    main(
        [
            "ablate",
            "--grid",
            "grid.yaml",
            "--out",
            "o",
            "--eval",
            "shapes",
            "d/shapes_qa.json",
            "tv=textvqa",
            "--data-root",
            str(root),
            "--limit",
            "3",
        ]
    )
    results = json.loads((tmp_path / "o/results.json").read_text())
    assert list(results["tasks"]) == ["shapes", "shapes_qa", "tv"]
    assert results["tasks"]["tv"] == {"bench": "textvqa", "root": str(root), "limit": 3}
    run = results["runs"]["connector/linear/seed0"]
    assert set(run["scores"]) == {"shapes", "shapes_qa", "tv"} and all(0 <= v <= 1 for v in run["scores"].values())
    md = (tmp_path / "o/results.md").read_text()
    assert "| cell | shapes | shapes_qa | tv | trainable |" in md and "benchmark textvqa" in md
    assert "vqa_accuracy" in md and "first 3" in md
    with pytest.raises(ValueError, match="another grid, budget or eval tasks"):
        ablate("grid.yaml", "o")  # the grid's own tasks differ


def test_a_cell_that_cannot_be_built_fails_before_anything_trains(tmp_path):
    from vlmforge.recipes.ablate import ablate

    grid = {
        "name": "broken",
        "seeds": 1,
        "budget": {
            "n_shapes": 8,
            "n_text": 4,
            "n_test": 4,
            "spec": dataclasses.asdict(SMALL),
            "batch_size": 8,
            "sft": {"max_steps": 1},
        },
        "base": {"model": {"vision_pooled": True}},  # 16 patches + the pooled token
        "groups": {
            "connector": [
                {"name": "linear", "model": {"connector": "linear"}},
                {"name": "shuffled", "model": {"connector": "pixel_shuffle"}},
            ]
        },
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(ValueError, match="cell 'shuffled': pixel_shuffle connector"):
        ablate(str(tmp_path / "grid.yaml"), tmp_path / "out", jobs=1)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["runs"] == {} and not (tmp_path / "out" / "runs").exists()


@pytest.mark.slow
def test_the_resolution_grid_on_the_words_task(tmp_path, monkeypatch):
    """The built-in `resolution` grid, its budget made tiny: wide and tall word images, scored per
    question kind, with each cell's mean visual tokens per held-out image."""
    from vlmforge.recipes import ablate as ab

    small = {
        "n_words": 12,
        "n_test": 6,
        "spec": dataclasses.asdict(SMALL),
        "batch_size": 8,
        "align": {"max_steps": 2},
        "sft": {"max_steps": 2},
    }
    built_in = ab.load_grid("resolution")  # the built-in grid, its budget made tiny, as a user's YAML
    grid = {**built_in.to_dict(), "seeds": 1, "budget": {**built_in.budget, **small}}
    (tmp_path / "resolution.yaml").write_text(yaml.safe_dump(grid))
    results = ab.ablate(str(tmp_path / "resolution.yaml"), tmp_path / "out", jobs=1)
    shared = json.loads((tmp_path / "out/shared.json").read_text())
    qa = {t: json.loads(open(shared["files"][f"test_{t}_qa"]).read()) for t in ("words", "letters", "count")}
    assert {len(q) for q in qa.values()} == {12}  # 6 held-out images per canvas, one question of each kind
    assert all("How many letters" in r["conversations"][0]["value"] for r in qa["letters"])
    assert all(r["conversations"][0]["value"].endswith("How many words are there?") for r in qa["count"])
    runs = {r["cell"]: r for r in results["runs"].values()}
    assert set(runs) == {c.name for c in built_in.groups["resolution"]}
    assert all(set(r["scores"]) == {"words", "letters", "count"} for r in runs.values())
    # 32 px encoder, 16 patches + the pooled token a view: wide 256 x 64 -> 1 x 4 slices, tall
    # 64 x 192 -> 3 x 1, each plus the whole; native: 64 x 16 -> 2 x 8 patches, 64 x 192 -> 24 x 64 -> 8 x 3
    tokens = {name: r["visual_tokens_per_image"] for name, r in runs.items()}
    assert tokens == {
        "pad to square": 17,
        "native aspect": (17 + 25) / 2,
        "fixed 2x2 + whole": 85,
        "adaptive <= 4 + whole": (5 + 4) * 17 / 2,
    }
    assert "| adaptive <= 4 + whole |" in (tmp_path / "out/results.md").read_text()
    with pytest.raises(ValueError, match="need the words data"):
        ab.ablate("idefics2", tmp_path / "other", eval=["words"])


def test_a_shared_setup_of_another_shape_is_refused_by_name(tmp_path):
    from vlmforge.recipes.pipeline import synthetic_setup

    (tmp_path / "shared.json").write_text(json.dumps({"train_shapes_sft": "x.json", "small": {}}))
    with pytest.raises(ValueError, match="shared.json: not the record of a synthetic setup"):
        synthetic_setup(tmp_path, 1, 1, 1, SMALL)
