"""One training engine (:mod:`faceops.train.engine`) and the tasks that run on it."""
