"""Working with a running CryoSPARC through the official ``cryosparc-tools`` client, 4.x (CryoSPARC v4) or
5.x (CryoSPARC v5).

* :mod:`~cryosieve.cryosparc.connection`: where CryoSPARC is and who we are (environment, then
  ``cryosparcm env``), how often to try; the licence id and password are never shown;
* :mod:`~cryosieve.cryosparc.clients`: the calls the commands make, as each major version accepts them;
* :mod:`~cryosieve.cryosparc.failures`: the cause of a failed call (unreachable, refused, server error);
* :mod:`~cryosieve.cryosparc.session`: connecting, the one retry policy, waiting on jobs, making and
  deleting them;
* :mod:`~cryosieve.cryosparc.graph`: the job graph of a refinement (planned without connecting);
* :mod:`~cryosieve.cryosparc.selection`: a selection given back to CryoSPARC as an External job.

``cryosparc-tools`` is an optional extra (``pip install "cryosieve[cryosparc]"``); it is imported
only when a connection is made.
"""
