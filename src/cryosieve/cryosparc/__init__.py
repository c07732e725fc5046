"""Working with a running CryoSPARC through the official ``cryosparc-tools`` client.

* :mod:`~cryosieve.cryosparc.connection`: where CryoSPARC is and who we are (environment, then
  ``cryosparcm env``), and a connection with bounded retries; the licence id is never shown;
* :mod:`~cryosieve.cryosparc.session`: the few client calls the commands make, in one place, so that
  the differences between cryosparc-tools 4.x and 5.x stay here;
* :mod:`~cryosieve.cryosparc.graph`: the job graph of a refinement (planned without connecting);
* :mod:`~cryosieve.cryosparc.selection`: a selection given back to CryoSPARC as an External job.

``cryosparc-tools`` is an optional extra (``pip install "cryosieve[cryosparc]"``); it is imported
only when a connection is made.
"""
