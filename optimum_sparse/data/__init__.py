from .calibration import CalibrationError, get_calibration_ids, load_texts, sample_windows, tokenize_texts
from .wiki import wiki_offline_texts

__all__ = ["CalibrationError", "get_calibration_ids", "load_texts", "sample_windows", "tokenize_texts", "wiki_offline_texts"]
