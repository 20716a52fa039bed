"""A tiny PTB-XL-layout folder written from the real PTB record s0010_re in tests/fixtures/wfdb.

s0010_re holds 15 leads at 1000 Hz (38.4 s); its first 12 are the standard leads. Windows of
10 s (every 2 s) are averaged down to 100 Hz (blocks of 10 samples -> 1000 samples) and written
with wfdb as records100/00000/<ecg_id>_lr, with a ptbxl_database.csv and scp_statements.csv in
PTB-XL's format.
"""

import csv
import os

import numpy as np

FIXTURE_WFDB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "fixtures", "wfdb")

# (statement, diagnostic, diagnostic_class): real PTB-XL statements; SR is a rhythm statement
STATEMENTS = [("NORM", "1.0", "NORM"), ("IMI", "1.0", "MI"), ("NDT", "1.0", "STTC"),
              ("LAFB", "1.0", "CD"), ("LVH", "1.0", "HYP"), ("SR", "", "")]
CODES = ["{'NORM': 100.0, 'SR': 0.0}", "{'IMI': 80.0, 'SR': 0.0}", "{'NDT': 100.0}",
         "{'LAFB': 100.0, 'IMI': 15.0}", "{'LVH': 50.0, 'NDT': 100.0}", "{'SR': 0.0}"]


def windows(count=14):
    import wfdb
    signal, fields = wfdb.rdsamp(os.path.join(FIXTURE_WFDB, "s0010_re"))
    assert fields["fs"] == 1000 and signal.shape[1] == 15
    leads = signal[:, :12]
    starts = range(0, len(leads) - 10000 + 1, 2000)
    out = [leads[s:s + 10000].reshape(1000, 10, 12).mean(1) for s in starts]
    return out[:count]


def write_ptbxl_folder(root, count=14, folds=None, corrupt=None):
    """Writes the fixture; returns the list of (ecg_id, fold, scp_codes). ``folds`` default:
    1-9 cycling, the last two records in fold 10. ``corrupt`` = "leads" writes record 3 with
    11 leads, "length" writes it 900 samples long."""
    import wfdb
    os.makedirs(os.path.join(root, "records100", "00000"), exist_ok=True)
    records = []
    for i, window in enumerate(windows(count)):
        ecg_id = i + 1
        fold = (folds[i] if folds else (10 if i >= count - 2 else i % 9 + 1))
        name = f"records100/00000/{ecg_id:05d}_lr"
        sig = window
        if corrupt == "leads" and ecg_id == 3:
            sig = window[:, :11]
        if corrupt == "length" and ecg_id == 3:
            sig = window[:900]
        wfdb.wrsamp(f"{ecg_id:05d}_lr", fs=100, units=["mV"] * sig.shape[1],
                    sig_name=["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4",
                              "V5", "V6"][:sig.shape[1]],
                    p_signal=sig, fmt=["16"] * sig.shape[1],
                    write_dir=os.path.join(root, "records100", "00000"))
        records.append((ecg_id, fold, CODES[i % len(CODES)], name))
    with open(os.path.join(root, "ptbxl_database.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ecg_id", "patient_id", "scp_codes", "strat_fold", "filename_lr",
                         "filename_hr"])
        for ecg_id, fold, codes, name in records:
            writer.writerow([ecg_id, 1000 + ecg_id, codes, fold, name,
                             name.replace("records100", "records500").replace("_lr", "_hr")])
    with open(os.path.join(root, "scp_statements.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "description", "diagnostic", "form", "rhythm", "diagnostic_class"])
        for code, diagnostic, cls in STATEMENTS:
            writer.writerow([code, code.lower(), diagnostic, "", "1.0" if code == "SR" else "", cls])
    return records
