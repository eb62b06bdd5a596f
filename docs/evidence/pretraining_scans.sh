# Sourced by the evidence scripts: the unlabelled pretraining CTs of ../shared/data as dataset 601 (patient B,
# the test patient, left out; patient A's labels are never read). Run inside the work folder, with $data set.
#   import_pretraining_cts SPACING CROP PROCESSES
import_pretraining_cts() {
  [[ -d nnUNet_raw/Dataset601_PretrainCT ]] && return 0
  for rel in ct_abdomen_ts_full/example_ct.nii.gz ct_spleen_msd/sub-spleen2_ct.nii.gz ct_aorta_cta/ct_cropped.nii.gz \
             ct_pulmonary/ct_cropped.nii.gz ct_lung_radiomics1/lung1_image.nrrd; do
    ln -sf "$data/$rel" "pretrain_scans/${rel//\//__}"
  done
  himae-nnunet import-scans -i pretrain_scans --dataset-id 601 --name PretrainCT --spacing "$1" "$1" "$1" \
    --crop-size "$2" -np "$3"
}
