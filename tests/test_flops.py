"""`himae-nnunet flops`: the compute the DESIGN measured on the authors' code, from the command line."""
import json
import subprocess
import sys


def run_flops(*args):
    res = subprocess.run([sys.executable, "-m", "himae_nnunet.cli", "flops", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_released_model_matches_reference_counts():
    rows = [json.loads(line) for line in run_flops("--model", "vit_b12_1536", "--stages", "0", "3",
                                                   "--json").splitlines()]
    mae, hiend = rows
    # DESIGN: encoder 44.78 GMACs (129 tokens), decoder blocks + head 11.72, projections 0.42
    assert abs(hiend["encoder_gmacs"] - 44.78) < 0.01 and mae["encoder_gmacs"] == hiend["encoder_gmacs"]
    assert abs(hiend["decoder_blocks_and_head_gmacs"] - 11.72) < 0.01
    assert abs(hiend["projection_gmacs"] - 0.42) < 0.01
    assert abs(hiend["total_gmacs"] - 56.9) < 0.05 and abs(mae["total_gmacs"] - 61.3) < 0.05
    # the paper's Table 7 (10.69 vs 16.44 G) left out the cross blocks' attention products
    assert abs(hiend["decoder_gmacs_paper_convention"] - 10.69) < 0.05
    assert abs(mae["decoder_gmacs_paper_convention"] - 16.44) < 0.05
    assert hiend["encoder_params"] == mae["encoder_params"] and hiend["decoder_params"] < mae["decoder_params"]


def test_table_output_for_small_preset():
    out = run_flops("--model", "vit_tiny", "--stages", "0", "1", "2", "3", "--crop", "64")
    lines = [line for line in out.splitlines() if line.startswith("| vit_tiny")]
    assert [line.split("|")[2].strip() for line in lines] == ["0", "1", "2", "3"]
