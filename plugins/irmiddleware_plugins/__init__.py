"""irmiddleware's built-in plugins (backend adapters, strategies). They use only the public hooks
and are registered through the `irmiddleware` entry-point group, exactly like a third party's."""
