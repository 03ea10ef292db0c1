from alignlab.platform import tracking


def test_tracking_defaults_to_a_stable_home_not_the_working_directory(monkeypatch, tmp_path):
    """`ray job submit --working-dir .` runs each job in a fresh copy of the code: the default
    store and storage must not live there, or every job starts from an empty store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ALIGNLAB_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert tracking.resolve_storage() == str(tmp_path / "home" / "ray_results")
    assert tracking.resolve_storage("s3://b/p") == "s3://b/p"
    monkeypatch.delenv("ALIGNLAB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert tracking.alignlab_home() == tmp_path / "user" / ".alignlab"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert tracking.resolve_tracking_uri() == "http://head:5000"
    assert tracking.resolve_tracking_uri("file:///x") == "file:///x"
    assert tracking.ui_command("sqlite:///a.db") == "mlflow ui --backend-store-uri sqlite:///a.db"


def test_a_local_store_keeps_its_artifacts_beside_it_not_in_the_working_directory(monkeypatch, tmp_path):
    """A run's artifacts land under the SQLite store's folder whichever directory the process
    runs in (MLflow's default, ./mlruns, followed the working directory); a server's store is
    left to the server."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "home" / "mlflow.db"
    store.parent.mkdir()
    elsewhere = tmp_path / "job_copy"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store}"
    exp = tracking.experiment_id(uri, "my exp/1")
    c = MlflowClient(tracking_uri=uri)
    assert c.get_experiment(exp).artifact_location == str(tmp_path / "home" / "mlartifacts" / "my_exp_1")
    run = c.create_run(exp)
    (tmp_path / "note.txt").write_text("kept")
    c.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert (tmp_path / "home" / "mlartifacts" / "my_exp_1" / run.info.run_id / "artifacts" / "note.txt").exists()
    assert list(elsewhere.iterdir()) == []
    assert tracking.local_artifact_location("http://head:5000", "x") is None


def test_runs_are_found_again_for_resume_and_params_batch(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id, created = tracking.find_or_create_run(uri, "exp", {"alignlab.run_key": "k"}, "k")
    assert created
    logger = tracking.RunLogger(uri, run_id)
    logger.log_params({f"p{i}": i for i in range(250)})  # over MLflow's 100-per-call limit
    logger.log_params({"p0": 0, "extra": "x"})  # re-logging on resume is harmless
    again, created = tracking.find_or_create_run(uri, "exp", {"alignlab.run_key": "k"}, "k", include_finished=False)
    assert again == run_id and not created
    logger.finish()
    fresh, created = tracking.find_or_create_run(uri, "exp", {"alignlab.run_key": "k"}, "k", include_finished=False)
    assert created and fresh != run_id
    params = tracking.client(uri).get_run(run_id).data.params
    assert len(params) == 251 and params["p249"] == "249"
    child, _ = tracking.find_or_create_run(uri, "exp", {"t": "c"}, "child", parent_run_id=run_id)
    assert tracking.client(uri).get_run(child).data.tags["mlflow.parentRunId"] == run_id


def test_experiments_are_of_the_training_kind_unless_someone_chose_one(tmp_path):
    """The MLflow UI opens a machine-learning experiment on its runs table, a GenAI one on traces."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    run = tracking.create_run(uri, "new", "r")
    new = c.get_experiment_by_name("new")
    assert new.tags["mlflow.experimentKind"] == "custom_model_development"
    older = c.create_experiment("older")  # made before AlignLab set a kind: it gets one
    assert tracking.experiment_id(uri, "older") == older
    assert c.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = c.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    tracking.experiment_id(uri, "chosen")
    assert c.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
    # MLflow 3.17's UI takes the view from the address, not from the kind.
    assert tracking.runs_page(uri, run) == \
        f"http://127.0.0.1:5000/#/experiments/{new.experiment_id}/runs?workflowType=machine_learning"


def test_a_run_logs_the_splits_it_reads_once_as_mlflow_datasets(tmp_path):
    import json

    import numpy as np

    from alignlab.platform import shards

    root = tmp_path / "flickr"
    with shards.ShardWriter(str(root), "tests", rows_per_file=4) as w:
        for i in range(9):
            w.write(shards.Row(image=b"\x89PNG", image_id=f"i{i}", caption=f"c {i}", caption_id=f"c{i}",
                               split="train" if i < 6 else "test", region_features=np.zeros((2, 4), np.float32),
                               boxes=np.zeros((2, 4), np.float32), tags=["dog", "cat"]))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.create_run(uri, "exp", "r")
    for _ in range(2):  # the second time, as a resumed run: nothing is added
        tracking.log_datasets(uri, run, str(root), [("train", tracking.TRAINING), ("test", tracking.EVALUATION),
                                                    ("", tracking.EVALUATION)])
    inputs = {i.dataset.name: i for i in tracking.client(uri).get_run(run).inputs.dataset_inputs}
    assert sorted(inputs) == ["flickr/test", "flickr/train"]
    assert {n: [(t.key, t.value) for t in i.tags] for n, i in inputs.items()} == {
        "flickr/train": [("mlflow.data.context", "training")], "flickr/test": [("mlflow.data.context", "evaluation")]}
    train = inputs["flickr/train"].dataset
    assert train.digest == shards.describe_split(str(root / "train")).digest
    assert (train.source_type, json.loads(train.source)) == ("local", {"uri": str(root / "train")})
    assert json.loads(train.profile) == {"num_rows": 6, "num_files": 2}
    columns = {c["name"]: c for c in json.loads(train.schema)["mlflow_colspec"]}
    assert columns["caption"] == {"type": "string", "name": "caption", "required": True}
    assert columns["image"]["type"] == "binary"
    assert columns["region_features"] == {"type": "array", "items": {"type": "array", "items": {"type": "float"}},
                                          "name": "region_features", "required": False}
    # A sweep's parent lists its trials' datasets, once each however often it gathers them.
    parent = tracking.create_run(uri, "exp", "sweep")
    for _ in range(2):
        tracking.gather_datasets(uri, parent, [run, run])
    assert {(i.dataset.name, i.dataset.digest, i.tags[0].value)
            for i in tracking.client(uri).get_run(parent).inputs.dataset_inputs} == \
        {(n, i.dataset.digest, i.tags[0].value) for n, i in inputs.items()}


def test_a_split_in_object_storage_is_logged_without_credentials_and_digested_as_its_copy(s3_root, tmp_path):
    import json

    from alignlab.platform import shards

    rows = [shards.Row(image=b"\x89PNG", image_id=f"i{i}", caption=f"c {i}", caption_id=f"c{i}", split="train")
            for i in range(3)]
    for root in (s3_root("sets/flickr"), str(tmp_path / "flickr")):
        with shards.ShardWriter(root, "tests") as w:
            w.write_all(rows)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.create_run(uri, "exp", "r")
    tracking.log_datasets(uri, run, s3_root("sets/flickr"), [("train", tracking.TRAINING)])
    (logged,) = tracking.client(uri).get_run(run).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.source_type) == ("flickr/train", "s3")
    assert json.loads(logged.dataset.source) == {"uri": "s3://shards/sets/flickr/train"}
    assert logged.dataset.digest == shards.describe_split(str(tmp_path / "flickr" / "train")).digest


def test_a_dataset_source_or_printed_address_never_carries_credentials():
    uri = "s3://KEY:SECRET@bucket/sets/flickr/train?endpoint_override=minio:9000&scheme=http"
    assert tracking._public_uri(uri) == "s3://bucket/sets/flickr/train"
    assert tracking._public_uri("http://alignlab:TOKEN@localhost:5000/") == "http://localhost:5000/"
    assert tracking._set_name("s3://KEY:SECRET@bucket/sets/flickr/?region=eu") == "flickr"


def test_system_metrics_log_into_the_run_by_id_and_continue_on_resume(tmp_path):
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.create_run(uri, "exp", "r")
    with tracking.system_metrics(uri, run, 0):  # 0: off
        time.sleep(0.3)
    assert not tracking.client(uri).get_run(run).data.metrics
    for _ in range(2):  # the second block as a resumed run's
        with tracking.system_metrics(uri, run, 0.1):
            time.sleep(0.5)
    metrics = tracking.client(uri).get_run(run).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    steps = [m.step for m in tracking.client(uri).get_metric_history(run, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and len(steps) >= 4  # the resumed block went on from the first's
