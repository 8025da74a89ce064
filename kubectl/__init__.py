"""`kubectl vnc`: the kubectl plugin of vncgate (console script `kubectl-vnc`).

It reads VncTargets from the API server with the user's own kubeconfig, and talks to the relay
with the user's own Kubernetes token (the relay checks it with a TokenReview and authorizes with
SubjectAccessReviews): share links, a local port for native VNC viewers, sessions and ending them.
It imports neither the relay nor the operator, nor any of the server's dependencies: it ships alone
as the `vncgate-kubectl` distribution and a zipapp (packaging/kubectl/).
"""
