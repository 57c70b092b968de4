"""DICOM in and out: one module per object (read, derived series, SEG, Parametric Map,
Secondary Capture), their shared helpers (``common``) and the ``dciodvfy`` check (``validate``)."""
