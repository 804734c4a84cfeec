"""Vision and cross-modal recipes (`potstill vision ...`): classifier, cross-modal and captioning KD runs."""
