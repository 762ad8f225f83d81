from lowmem_gblm.calib.data import calibration_windows, load_documents, load_ids, save_ids

__all__ = ["calibration_windows", "load_documents", "load_ids", "save_ids"]
