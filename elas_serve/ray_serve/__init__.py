"""elas-serve on Ray Serve (`pip install 'elas-serve[ray]'`): N engine replicas behind one
OpenAI-compatible ingress, routed by load with prefix affinity. `elas-serve serve --replicas N`
starts it; docs/scaling.md shows the multi-machine form. Nothing here is imported unless used."""
