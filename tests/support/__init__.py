"""What the tests run beside them: the storage servers (:mod:`support.servers`, also used by ``bench``) and the
training jobs started as subprocesses (``keras_job.py``, ``mwms_job.py``). pytest puts ``tests/`` on ``sys.path``
(rootdir ``conftest.py``), so tests import ``support.servers``; the bench imports ``tests.support.servers``."""
