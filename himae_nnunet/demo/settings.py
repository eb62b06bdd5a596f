"""The demo's dataset, plans and the trainers it compares."""
DATASET_ID = 990
DATASET = f"Dataset{DATASET_ID}_HiEndDemo"
PLANS = "nnUNetPlans_himae"
NUM_TEST = 4  # held-out synthetic test scans: 4 x 3 labels = 12 paired scores
TRAINERS = {"Hi-End-MAE": "nnUNetTrainerHiEndMAE", "scratch UNETR": "nnUNetTrainerUNETR"}
