"""Pseudo masks: TransFusion anomaly maps turned into binary training masks, without looking at GT."""
