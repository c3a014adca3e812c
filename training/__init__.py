"""clipguard.training"""
