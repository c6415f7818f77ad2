"""Weak annotations shipped with gcrf (data only): VOC clicks and the ScribbleSup manifest."""
