"""bench export --mlflow: results as MLflow runs, read back through MLflow's own client (skipped
without the extra, pip install 'emotion-bench[mlflow]')."""
import pytest

from conftest import invoke


def test_bad_uris_and_a_missing_extra_are_one_line(tmp_path, capsys):
    code, out = invoke(["export", str(tmp_path), "--mlflow", str(tmp_path / "mlruns")], capsys)
    assert code == 2 and "MLflow deprecates its file store" in out and "Traceback" not in out


def test_results_round_trip_through_mlflows_own_client(tmp_path, capsys):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from test_sweep_report import fixture_result, write_all

    results = [fixture_result(strategy="single", devices=1, thr=100.0, f1=0.8),
               fixture_result(strategy="ddp", devices=2, thr=180.0, f1=0.75)]
    folder = write_all(tmp_path / "runs", results)
    trace = folder / f"{results[1]['run_id']}.rank0.trace.json.gz"  # a file beside its result
    trace.write_bytes(b"\x1f\x8b")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out = invoke(["export", str(folder), "--mlflow", uri], capsys)
    assert code == 0 and "2 run(s) exported" in out, out
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("emotion-bench")
    runs = {r.data.tags["emotion_bench.run_id"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {r["run_id"] for r in results}
    for r in results:
        got = runs[r["run_id"]]
        assert got.data.params["strategy"] == r["config"]["strategy"]
        assert got.data.params["devices"] == str(r["config"]["devices"])
        assert got.data.metrics["samples_per_s"] == pytest.approx(r["throughput"]["samples_per_s"])
        assert got.data.metrics["macro_f1"] == pytest.approx(r["quality"]["test"]["macro_f1"])
        assert got.data.tags["status"] == r["status"] and got.info.status == "FINISHED"
        losses = client.get_metric_history(got.info.run_id, "loss")
        assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(r["losses"])
        names = {a.path for a in client.list_artifacts(got.info.run_id)}
        assert f"{r['run_id']}.json" in names
    assert trace.name in {a.path for a in client.list_artifacts(runs[results[1]["run_id"]].info.run_id)}
    code, out = invoke(["export", str(folder), "--mlflow", uri], capsys)
    assert code == 0 and "0 run(s) exported" in out and "2 there already" in out  # idempotent
    assert len(client.search_runs([exp.experiment_id])) == 2
    del mlflow
