"""The real parts that the tests, the benchmarks and the demo run, outside the product.

A real Xvnc on a free display (`xvnc`), a real control plane of etcd, kube-apiserver and
kube-controller-manager (`cluster`), stand-in TCP servers (`servers`), HAProxy as an Ingress
or a balancer (`haproxy`), raw WebSocket frames (`rawws`), certificates from a throw-away CA
(`certs`, `vncsecurity`) and polling with a deadline (`waiting`). Tests, `bench/` and
`scripts/demo.py` import from here; nothing here imports the tests, and the `vncgate` package
imports none of it.
"""
