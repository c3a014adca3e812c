# A tiny image that carries one checkpoint, for the Kubernetes init container that copies it
# into the worker pod (deploy/k8s/deployment.yaml). Versioning the model as an image makes a
# model roll-out an ordinary Deployment roll-out. Build with deploy/ as the context:
#
#   docker build -f deploy/model.Dockerfile -t registry.example.com/clipguard-model:v1 deploy
#
# with the checkpoint directory (model.safetensors + manifest.json) at deploy/models/detector.
FROM busybox:1.36
COPY models/detector /model/detector
USER 10001:10001
