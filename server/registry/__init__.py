"""The model registry: content-addressed artifacts, the TUF repository that signs them,
and the HTTP(S) server devices download from."""
