"""Data pipeline: protocol borders, no leakage, window contents, and every bad-input error."""
import io
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch

from nas_agent import data as data_mod
from nas_agent.data import DataError, load_dataset, read_series_csv, resolve_data_path, split_borders, time_features
from nas_agent.schema import DataConfig


def write_csv(path, n=400, start="2020-01-01", freq="h", cols=("a", "b", "OT"), seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, len(cols))), columns=list(cols))
    df.insert(0, "date", pd.date_range(start, periods=n, freq=freq).strftime("%Y-%m-%d %H:%M:%S"))
    df.to_csv(path, index=False)
    return df


def cfg(path, **kw):
    base = dict(path=str(path), seq_len=24, label_len=12, pred_len=12)
    base.update(kw)
    return DataConfig(**base)


def test_ett_borders_follow_the_protocol():
    assert split_borders(17420, 96, "auto", [0.7, 0.1, 0.2], "ETTh1.csv") == [(0, 8640), (8544, 11520), (11424, 14400)]
    assert split_borders(69680, 96, "auto", [0.7, 0.1, 0.2], "ETTm1.csv") == [(0, 34560), (34464, 46080),
                                                                             (45984, 57600)]


def test_ratio_borders_are_70_10_20_in_time_order():
    (a, b), (c, d), (e, f) = split_borders(1000, 50, "ratio", [0.7, 0.1, 0.2], "x.csv")
    assert (a, b, c, d, e, f) == (0, 700, 650, 800, 750, 1000)


def test_real_ettH1_split_sizes(data_dir):
    ds = load_dataset(DataConfig(path="data/ETTh1.csv"), "timeF")
    assert ds.borders == [(0, 8640), (8544, 11520), (11424, 14400)]
    # stride-1 windows: rows - seq_len - pred_len + 1
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8640 - 191, 2976 - 191, 2976 - 191)
    assert ds.columns[-1] == "OT" and ds.enc_in == 7 and ds.c_out == 7


def test_scaler_is_fitted_on_training_rows_only(tmp_path):
    path = tmp_path / "s.csv"
    df = write_csv(path, n=400)
    ds = load_dataset(cfg(path), "timeF")
    train_rows = df[["a", "b", "OT"]].to_numpy()[:280]
    np.testing.assert_allclose(ds.mean, train_rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ds.std, train_rows.std(0), rtol=1e-4)
    # Poison everything after the training rows: the scaler must not move.
    df.loc[280:, ["a", "b", "OT"]] = 1e6
    df.to_csv(path, index=False)
    ds2 = load_dataset(cfg(path), "timeF")
    np.testing.assert_array_equal(ds.mean, ds2.mean)
    np.testing.assert_array_equal(ds.std, ds2.std)
    # ... while the test windows do see the (scaled) poisoned values.
    assert ds2.test.batch(torch.tensor([len(ds2.test) - 1]))[4].abs().min() > 1e3


def test_windows_and_decoder_input(tmp_path):
    path = tmp_path / "w.csv"
    df = write_csv(path, n=400)
    ds = load_dataset(cfg(path, scale=False), "timeF")
    idx = torch.tensor([0, 5, len(ds.train) - 1])
    x_enc, m_enc, x_dec, m_dec, y = ds.train.batch(idx)
    assert x_enc.shape == (3, 24, 3) and m_enc.shape == (3, 24, 4)
    assert x_dec.shape == (3, 24, 3) and m_dec.shape == (3, 24, 4) and y.shape == (3, 12, 3)
    raw = torch.tensor(df[["a", "b", "OT"]].to_numpy(), dtype=torch.float32)
    for row, s in enumerate(idx.tolist()):
        torch.testing.assert_close(x_enc[row], raw[s:s + 24])
        torch.testing.assert_close(x_dec[row, :12], raw[s + 12:s + 24])  # last label_len known steps
        assert torch.all(x_dec[row, 12:] == 0)  # then zeros
        torch.testing.assert_close(y[row], raw[s + 24:s + 36])


def test_feature_modes_and_target_last(tmp_path):
    path = tmp_path / "f.csv"
    write_csv(path, cols=("OT", "a", "b"))
    s = load_dataset(cfg(path, features="S"), "timeF")
    ms = load_dataset(cfg(path, features="MS"), "timeF")
    assert s.columns == ["OT"] and s.enc_in == 1 and s.c_out == 1
    assert ms.columns == ["a", "b", "OT"] and ms.enc_in == 3 and ms.c_out == 1
    x_enc, _, _, _, y = ms.train.batch(torch.tensor([0]))
    torch.testing.assert_close(y[0, :, 0], ms.train.batch(torch.tensor([24]))[0][0, :12, 2])


def test_every_test_window_is_scored(tmp_path):
    path = tmp_path / "n.csv"
    write_csv(path, n=400)
    ds = load_dataset(cfg(path), "timeF")
    seen = sum(b[0].shape[0] for b in ds.test.batches(7))
    assert seen == len(ds.test) == 80 + 24 - 36 + 1


def test_time_features():
    dates = pd.date_range("2021-01-01", periods=24 * 400, freq="h")
    f = time_features(pd.DatetimeIndex(dates), "timeF")
    assert f.shape == (len(dates), 4) and f.min() >= -0.5 and f.max() <= 0.5
    assert f[:, 0].min() == -0.5 and f[:, 0].max() == 0.5  # hour spans the range
    cal = time_features(pd.DatetimeIndex(dates), "fixed")
    assert cal[:, 0].min() == 1 and cal[:, 0].max() == 12  # month
    assert cal[:, 3].max() == 23  # hour


@pytest.mark.parametrize("mutate, expected", [
    (lambda t: t.replace("date,", "time,", 1), "no 'date' column"),
    (lambda t: t.replace(",OT", ",XX", 1), "target column 'OT' not found"),
    (lambda t: t.replace("\n2020-01-01 05:00:00,", "\n2020-01-01 05:00:00,abc", 1), ":7: column 'a' has the non-numeric value"),
    (lambda t: _blank_cell(t, 10), ":11: column 'a' has a missing value (NaN)"),
    (lambda t: t.replace("2020-01-01 03:00:00", "not a date", 1), ":5: unparsable date 'not a date'"),
    (lambda t: t.replace("2020-01-01 03:00:00", "2019-01-01 03:00:00", 1), ":5: dates are not strictly increasing"),
])
def test_bad_input_gets_a_clear_error(tmp_path, mutate, expected):
    path = tmp_path / "bad.csv"
    write_csv(path, n=400)
    path.write_text(mutate(path.read_text()))
    with pytest.raises(DataError) as e:
        load_dataset(cfg(path), "timeF")
    assert str(path) in str(e.value)
    assert expected in str(e.value)


def _blank_cell(text, line_index):
    lines = text.split("\n")
    date, _, rest = lines[line_index].split(",", 2)
    lines[line_index] = f"{date},,{rest}"
    return "\n".join(lines)


def test_unsorted_dates_in_reverse(tmp_path):
    path = tmp_path / "r.csv"
    df = write_csv(path, n=100)
    df.iloc[::-1].to_csv(path, index=False)
    with pytest.raises(DataError, match="not strictly increasing"):
        read_series_csv(path, "OT")


def test_too_few_rows_for_a_split(tmp_path):
    path = tmp_path / "short.csv"
    write_csv(path, n=120)
    with pytest.raises(DataError) as e:
        load_dataset(cfg(path, seq_len=48, pred_len=24, label_len=24), "timeF")
    assert "the val split has" in str(e.value) and "seq_len + pred_len = 72" in str(e.value)


def test_ett_protocol_needs_enough_rows(tmp_path):
    path = tmp_path / "ETTh9.csv"
    write_csv(path, n=1000)
    with pytest.raises(DataError, match="needs 14400 rows, the file has 1000"):
        load_dataset(cfg(path), "timeF")


def test_data_dir_env_takes_the_file_by_name(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("NAS_DATA_DIR", str(data_dir))
    assert resolve_data_path("data/ETTh2.csv") == data_dir / "ETTh2.csv"


def test_missing_file_offline_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NAS_DATA_DIR", str(tmp_path / "empty"))

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(data_mod.urllib.request, "urlopen", offline)
    dest = tmp_path / "data" / "ETTh1.csv"
    with pytest.raises(DataError) as e:
        resolve_data_path(dest)
    msg = str(e.value)
    assert "download from https://raw.githubusercontent.com/zhouhaoyi/ETDataset" in msg
    assert f"Copy ETTh1.csv to {dest}" in msg and "NAS_DATA_DIR" in msg
    with pytest.raises(DataError, match="data file not found"):
        resolve_data_path(tmp_path / "mine.csv")


def test_download_verifies_checksum(tmp_path, monkeypatch, data_dir):
    good = (data_dir / "ETTh1.csv").read_bytes()
    monkeypatch.setattr(data_mod.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(good))
    dest = tmp_path / "d" / "ETTh1.csv"
    assert data_mod.download_ett("ETTh1.csv", dest) == dest and dest.read_bytes() == good
    monkeypatch.setattr(data_mod.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(good[:-10]))
    bad_dest = tmp_path / "e" / "ETTh1.csv"
    with pytest.raises(DataError, match="sha256"):
        data_mod.download_ett("ETTh1.csv", bad_dest)
    assert not bad_dest.exists()


@pytest.mark.parametrize("name", ["ETTh2.csv", "exchange_rate.csv", "national_illness.csv"])
def test_other_shared_datasets_load(name):
    ds = load_dataset(DataConfig(path=f"data/{name}", seq_len=36, label_len=18, pred_len=24), "timeF")
    assert len(ds.test) > 0 and np.isfinite(ds.mean).all()


@pytest.mark.parametrize("features", ["M", "S", "MS"])
def test_target_rows_hold_every_windows_target(tmp_path, features):
    """Windows.target_rows: forecasts.npz stores each split's targets once, not per window."""
    from nas_agent.forecasts import windows
    path = tmp_path / "t.csv"
    write_csv(path, n=400)
    ds = load_dataset(cfg(path, features=features), "timeF")
    for split in (ds.train, ds.val, ds.test):
        rows = split.target_rows()
        assert rows.shape == (len(split) + 12 - 1, ds.c_out) and rows.dtype == np.float32
        y = split.batch(torch.arange(len(split)))[4]
        assert np.array_equal(windows(rows, 12), y.numpy())
