#!/bin/sh
# Registers the namespace Modelium uses (temporal.namespace), once Temporal answers.
set -eu
namespace=${NAMESPACE:-default}
until temporal operator cluster health --address "$TEMPORAL_ADDRESS" >/dev/null 2>&1; do sleep 1; done
if temporal operator namespace describe --address "$TEMPORAL_ADDRESS" --namespace "$namespace" >/dev/null 2>&1; then
  echo "namespace $namespace exists"
else
  temporal operator namespace create --address "$TEMPORAL_ADDRESS" --namespace "$namespace" --retention 7d
fi
