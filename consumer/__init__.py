"""clipguard.consumer"""
