# The offline model as an image of its own, copied into each pod by the Deployment's init container
# (deploy/k8s/deployment.yaml), so pods start without the model hub. Build it with models/ as the
# context (the repository's .dockerignore leaves models/ out of the server's image):
#   make models/smollm2-135m-instruct/config.json
#   docker build -f deploy/model.Dockerfile -t llm-generator-model:smollm2-135m-instruct models/
FROM busybox:1.37

# Owned by the service's uid (10001, as in ../Dockerfile): the init container runs as that user,
# and a model file only its creator may read (mode 600) must still be readable to it.
COPY --chown=10001:10001 smollm2-135m-instruct /model

USER 10001:10001
