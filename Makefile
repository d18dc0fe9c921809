# Build and push the faceops container images.
#   make images REGISTRY=registry.example.com/team TAG=0.1.0
#   make push   REGISTRY=registry.example.com/team TAG=0.1.0
# Image names come from src/faceops/images.py (the one place that names them); the Dockerfile of a
# role is images/<role>/Dockerfile and the build context is the repository root (see .dockerignore).

PYTHON ?= python3
DOCKER ?= docker
REGISTRY ?= ghcr.io/faceops
TAG ?= $(shell PYTHONPATH=src $(PYTHON) -c 'import faceops; print(faceops.__version__)')
ROLES ?= $(shell PYTHONPATH=src $(PYTHON) -c 'from faceops.images import IMAGES; print(*IMAGES)')
DOCKER_BUILD_ARGS ?=

# image reference of a role, e.g. $(call image_ref,trainer)
image_ref = $(shell PYTHONPATH=src FACEOPS_IMAGE_REGISTRY=$(REGISTRY) FACEOPS_IMAGE_TAG=$(TAG) \
	$(PYTHON) -c 'from faceops.images import image; print(image("$(1)"))')

.PHONY: images push list-images $(addprefix image-,$(ROLES)) $(addprefix push-,$(ROLES))

images: $(addprefix image-,$(ROLES))

push: $(addprefix push-,$(ROLES))

list-images:
	@$(foreach role,$(ROLES),echo "$(role) $(call image_ref,$(role))";)

define role_rules
image-$(1):
	$$(DOCKER) build $$(DOCKER_BUILD_ARGS) -f images/$(1)/Dockerfile -t $$(call image_ref,$(1)) .

push-$(1): image-$(1)
	$$(DOCKER) push $$(call image_ref,$(1))
endef
$(foreach role,$(ROLES),$(eval $(call role_rules,$(role))))
