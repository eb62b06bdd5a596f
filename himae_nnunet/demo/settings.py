"""The demo's dataset, plans and the trainers it compares."""
DATASET_ID = 990
DATASET = f"Dataset{DATASET_ID}_HiEndDemo"
PLANS = "nnUNetPlans_himae"
TRAINERS = {"Hi-End-MAE": "nnUNetTrainerHiEndMAE", "scratch UNETR": "nnUNetTrainerUNETR"}
