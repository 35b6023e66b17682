"""Scale-out on existing engines: Envoy in front of replicas of `python -m service` (deploy/envoy/envoy.yaml.tmpl),
the local cluster behind `./scripts/cluster.sh` (deploy/cluster.py), and the Kubernetes manifests (deploy/k8s/)."""
